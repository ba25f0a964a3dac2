"""Prompt suites: GenEval, DPG-Bench, T2I-CompBench (copied in ``benchmarks/`` with their
licenses) and a held-out synthetic compositional suite with ground truth."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SUITES = ("synthetic", "geneval", "dpg", "t2i-compbench")
HELDOUT_SEED = 10_000  # the suite's own draw of the held-out split (data_tools.synthetic.is_heldout)
SUITE_CAPTION = "medium"  # the synthetic suite's prompt: the caption kind that states every group's side


@dataclass(frozen=True)
class PromptItem:
    suite: str
    index: int
    prompt: str
    category: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def _cap(items: list[PromptItem], limit: int | None) -> list[PromptItem]:
    """The first ``limit`` prompts of every category (all when ``limit`` is None)."""
    if limit is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for item in items:
        if seen.get(item.category, 0) < limit:
            seen[item.category] = seen.get(item.category, 0) + 1
            out.append(item)
    return out


def synthetic_suite(n: int, size: int, seed: int = HELDOUT_SEED) -> list[PromptItem]:
    """``n`` distinct scenes of the held-out split (never in the sample data: the split is by the
    scene's groups, :func:`data_tools.synthetic.is_heldout`) with their English *medium*
    ground-truth caption as the prompt ("An illustration of two red stars on the left and one purple
    circle on the right."): it states every group's count, colour, shape and side, all of which the
    scorer checks (the short caption names no side, so position and per-side counts could not be
    asked of a model)."""
    from data_tools.synthetic import captions, distinct_scene, groups

    rng = random.Random(seed)
    items = []
    seen: set = set()
    for i in range(n):
        objects = distinct_scene(rng, size, seen, heldout=True)
        prompt = next(
            c["text"] for c in captions(objects) if (c["granularity"], c["language"]) == (SUITE_CAPTION, "en")
        )
        category = "two_groups" if len(groups(objects)) > 1 else "one_group"
        items.append(
            PromptItem("synthetic", i, prompt, category, {"groups": groups(objects), "objects": objects})
        )
    return items


def load_suite(
    name: str, limit: int | None = None, *, root: Path = BENCHMARKS, size: int = 128
) -> list[PromptItem]:
    """The prompts of one suite; ``limit`` caps the prompts per category."""
    if name == "synthetic":
        return synthetic_suite(limit or 64, size)
    if name == "geneval":
        lines = (root / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
        items = [PromptItem(name, i, m["prompt"], m["tag"], m) for i, m in enumerate(map(json.loads, lines))]
    elif name == "dpg":
        lines = (root / "dpg-bench" / "prompts.jsonl").read_text().splitlines()
        items = [
            PromptItem(name, i, m["prompt"], "dense", {"id": m["id"]})
            for i, m in enumerate(map(json.loads, lines))
        ]
    elif name == "t2i-compbench":
        items = []
        for path in sorted((root / "t2i-compbench").glob("*_val.txt")):
            category = path.name.removesuffix("_val.txt")
            prompts = [p.strip() for p in path.read_text().splitlines() if p.strip()]
            items += [PromptItem(name, i, p, category) for i, p in enumerate(prompts)]
    else:
        raise ConfigError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return _cap(items, limit)
