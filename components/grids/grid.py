"""Multi-image grid samples (paper Sec. 3, Template C): an image paired with condition maps in a
dual-panel (upper/lower or left/right halves) or a 2x2 grid, at a training bucket size, with the
Template C fill-ins that describe it.

**Layouts** (:data:`LAYOUTS`), named image panel first: ``upper-lower`` (the image in the upper
half, the map in the lower half: the paper's example) and ``left-right`` (image left, map right),
the names and panel order the dual-panel sampler uses (:mod:`model.sampler.conditioning`); their
swapped forms ``lower-upper`` and ``right-left`` (weight 0 by default, as the sampler never asks
for them); and ``2x2`` (the image top-left; three different maps top-right, bottom-left,
bottom-right).
The grid is a bucket of :func:`components.train.data.bucket_sizes` (sides multiples of 64, area at
most ``resolution``²) nearest to the grid's natural aspect, so every panel's sides are multiples of
32 (the VAE x8 · patch x2 grid holds). The image is resized to cover its panel and centre-cropped;
an annotator draws its map from that panel image, and a synthetic scene's ground-truth maps are
drawn from its boxes mapped into the panel, so image and maps are aligned pixel for pixel.

**Maps**: a synthetic row (its scene objects in an ``objects`` cell or in the ``metadata.jsonl``
beside its image file) uses the exact ground truth (:mod:`components.grids.ground_truth`: depth,
object masks, edges as ``canny``) and, for other kinds, the annotators without weights (``sketch``);
any other row uses the annotators available here (:mod:`components.grids.annotators.registry`:
canny and sketch always, depth and pose with weights configured). Which map kinds and layouts are
drawn, and how often, is :class:`GridConfig` (weights, seeded).

**Captions** — fill-ins stored per row, template applied by the trainer: a grid row keeps its source
image's ``captions`` entries unchanged (``granularity`` / ``language`` / ``text``, so every reader of
the manifest schema parses them as before and the caption-kind and language weights of training
apply to grids too), has ``domain = "grid"`` and ``system_prompt = "C"``, and carries the Template C
fill-ins per caption language in ``grid_fill`` (JSON ``{"en": {...}, "zh": {...}}``:
``panels``, ``panel_a`` / ``panel_kind`` / ``panel_b`` for a dual panel, ``panel_maps`` /
``panel_b`` for 2x2). :func:`model.prompts.apply_grid_fills` turns a caption and its language's
fill-ins into the training text (:func:`grid_caption_texts` does it for a whole row), English
template for English captions, the Chinese one for Chinese. Storing fill-ins rather than finished
texts keeps one source of truth for the template wording (``model/prompts.py``), avoids a double
system prompt when the trainer prepends its per-domain template, and lets the wording change without
rebuilding the grids. The trainer applies them (:func:`components.train.data.prompt_texts`): every
caption variant of a grid row, the drawn one and the validation one get Template C.

:func:`build_grids` writes the grid PNGs under ``out_dir/images/``, ``out_dir/grids.parquet`` (the
rows it returns: the tier manifests' :data:`components.tier.tier.TRAIN_COLUMNS` plus ``grid_layout``,
``grid_kind``, ``grid_fill``, ``grid_source``, ``grid_maps``; ``image_path`` relative to ``out_dir``)
and ``out_dir/grids.json`` (counts, the annotators used and those not run, with why).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError, LuminaError, first_line, validation_message
from components.grids.annotators import registry
from components.grids.annotators.registry import MAP_KINDS, MODEL_PLUGINS, Annotator
from components.grids.ground_truth import GROUND_TRUTH_KINDS, fit_objects, ground_truth_maps, scene_objects
from components.train.data import bucket_sizes, decode_image, nearest_bucket
from model.prompts import GRID_DOMAIN, SystemPrompt, apply_grid_fills
from storage.io import is_s3
from storage.shards import image_bytes

log = logging.getLogger(__name__)

GRID_COLUMNS = ("grid_layout", "grid_kind", "grid_fill", "grid_source", "grid_maps")
LANGUAGES = ("en", "zh")
GROUND_TRUTH = "ground-truth"
MANIFEST, SUMMARY, IMAGES = "grids.parquet", "grids.json", "images"

Cell = tuple[int, int]  # (row, column)


@dataclass(frozen=True)
class Layout:
    name: str
    rows: int
    cols: int
    image: Cell
    maps: tuple[Cell, ...]

    @property
    def panels(self) -> str:
        """The Template C variant: ``dual`` or ``2x2``."""
        return "2x2" if len(self.maps) > 1 else "dual"


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("upper-lower", 2, 1, (0, 0), ((1, 0),)),
        Layout("lower-upper", 2, 1, (1, 0), ((0, 0),)),
        Layout("left-right", 1, 2, (0, 0), ((0, 1),)),
        Layout("right-left", 1, 2, (0, 1), ((0, 0),)),
        Layout("2x2", 2, 2, (0, 0), ((0, 1), (1, 0), (1, 1))),
    )
}

PANEL_NAMES: dict[tuple[int, int], dict[Cell, dict[str, str]]] = {
    (2, 1): {(0, 0): {"en": "upper half", "zh": "上半部分"}, (1, 0): {"en": "lower half", "zh": "下半部分"}},
    (1, 2): {(0, 0): {"en": "left half", "zh": "左半部分"}, (0, 1): {"en": "right half", "zh": "右半部分"}},
    (2, 2): {
        (0, 0): {"en": "top-left panel", "zh": "左上方画面"},
        (0, 1): {"en": "top-right panel", "zh": "右上方画面"},
        (1, 0): {"en": "bottom-left panel", "zh": "左下方画面"},
        (1, 1): {"en": "bottom-right panel", "zh": "右下方画面"},
    },
}
"""The spatial words of Template C per grid shape, cell and language (paper: "upper half")."""

KIND_NAMES: dict[str, dict[str, str]] = {
    "canny": {"en": "canny edge map", "zh": "Canny边缘图"},
    "sketch": {"en": "sketch", "zh": "素描图"},
    "depth": {"en": "depth map", "zh": "深度图"},
    "pose": {"en": "human pose map", "zh": "人体姿态图"},
    "mask": {"en": "segmentation mask", "zh": "分割掩码图"},
}
"""What each map kind is called in Template C ("displays a {depth map}")."""


class GridConfig(BaseModel):
    """Which grids :func:`build_grids` makes: map kinds and layouts drawn by weight (relative
    frequencies; 0 = never), seeded."""

    model_config = ConfigDict(extra="forbid")

    kinds: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(MAP_KINDS, 1.0),
        description=f"weight per map kind ({', '.join(MAP_KINDS)}); among the kinds a row has",
    )
    layouts: dict[str, float] = Field(
        default_factory=lambda: {
            "upper-lower": 1.0,
            "left-right": 1.0,
            "2x2": 0.5,
            "lower-upper": 0.0,
            "right-left": 0.0,
        },
        description=f"weight per layout ({', '.join(LAYOUTS)})",
    )
    seed: int = 0
    max_grids: int | None = Field(None, ge=1, description="grids at most (None: one per usable row)")
    resolution: int = Field(256, ge=64, description="grid area at most resolution² (the stage's buckets)")
    weights: dict[str, str] = Field(
        default_factory=dict,
        description=f"weights folder or hub id per model annotator ({', '.join(MODEL_PLUGINS)}); "
        "else their environment variables",
    )
    ground_truth: bool = Field(True, description="exact maps for synthetic scenes with metadata")
    tier: str = Field("hq", description="the tier whose images are paired with maps (pipeline step)")
    ordinary_share: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="share of the unified phase's samples that are ordinary images of the tier (the"
        " rest are grids); the paper mixes them but gives no ratio",
    )

    @field_validator("tier")
    @classmethod
    def _tier(cls, value: str) -> str:
        from components.tier.tiering import TIERS

        if value not in TIERS:
            raise ValueError(f"unknown tier {value!r}; choose from: {', '.join(TIERS)}")
        return value

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: dict[str, float]) -> dict[str, float]:
        return _weights(value, MAP_KINDS, "map kind")

    @field_validator("layouts")
    @classmethod
    def _layouts(cls, value: dict[str, float]) -> dict[str, float]:
        return _weights(value, tuple(LAYOUTS), "layout")

    @field_validator("weights")
    @classmethod
    def _model_weights(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(MODEL_PLUGINS))
        if unknown:
            raise ValueError(
                f"no model annotator {', '.join(unknown)}; choose from: {', '.join(MODEL_PLUGINS)}"
            )
        return value


def _weights(value: dict[str, float], known: tuple[str, ...], what: str) -> dict[str, float]:
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from: {', '.join(known)}")
    if any(w < 0 for w in value.values()):
        raise ValueError(f"{what} weights must not be negative")
    if not any(w > 0 for w in value.values()):
        raise ValueError(f"at least one {what} needs a positive weight")
    return value


def grid_config(value: GridConfig | Mapping[str, Any] | None = None) -> GridConfig:
    """A :class:`GridConfig` from itself, a mapping (e.g. a YAML file's) or ``None`` (defaults);
    :class:`ConfigError` in one line for a bad one."""
    if isinstance(value, GridConfig):
        return value
    try:
        return GridConfig(**dict(value or {}))
    except ValidationError as exc:
        raise ConfigError(f"grid config: {validation_message(exc)}") from None


def parse_grid_config(text: str) -> GridConfig:
    """A :class:`GridConfig` from JSON (the pipeline's ``grid_config_json``; "" = defaults);
    :class:`ConfigError` in one line for bad JSON or a bad field."""
    if not text.strip():
        return GridConfig()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"grid config is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError("grid config must be a JSON object of GridConfig fields")
    return grid_config(raw)


# --- choosing ----------------------------------------------------------------------------------


def choose_grid(
    rng: random.Random, kinds: Iterable[str], config: GridConfig
) -> tuple[Layout, list[str]] | None:
    """A layout and its map kinds (panel order) for a row that can have ``kinds``, by the config's
    weights: 2x2 needs three different kinds (else one of the dual layouts is drawn instead);
    ``None`` when the row has no weighted kind."""
    weighted = [k for k in MAP_KINDS if k in set(kinds) and config.kinds.get(k, 0.0) > 0]
    if not weighted:
        return None
    layouts = [
        LAYOUTS[n] for n, w in config.layouts.items() if w > 0 and len(LAYOUTS[n].maps) <= len(weighted)
    ]
    if not layouts:
        return None
    layout = rng.choices(layouts, weights=[config.layouts[lay.name] for lay in layouts], k=1)[0]
    chosen: list[str] = []
    pool = list(weighted)
    for _ in layout.maps:  # weighted draws without replacement
        kind = rng.choices(pool, weights=[config.kinds[k] for k in pool], k=1)[0]
        chosen.append(kind)
        pool.remove(kind)
    return layout, chosen


# --- geometry ----------------------------------------------------------------------------------


def grid_size(
    layout: Layout, image_size: tuple[int, int], resolution: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((grid w, h), (panel w, h))``: the bucket nearest the grid's aspect with the image's panels."""
    width, height = image_size
    bucket_h, bucket_w = nearest_bucket(width * layout.cols, height * layout.rows, bucket_sizes(resolution))
    return (bucket_w, bucket_h), (bucket_w // layout.cols, bucket_h // layout.rows)


def panel_boxes(layout: Layout, panel: tuple[int, int]) -> dict[Cell, tuple[int, int, int, int]]:
    """Each cell's ``(left, top, right, bottom)`` in the grid image."""
    pw, ph = panel
    return {
        (r, c): (c * pw, r * ph, (c + 1) * pw, (r + 1) * ph)
        for r in range(layout.rows)
        for c in range(layout.cols)
    }


def fit_image(image: Image.Image, size: tuple[int, int], resample: int = Image.BICUBIC) -> Image.Image:
    """Resize ``image`` to cover ``size`` (w, h) and centre-crop it (as training's ``load_image``)."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    resized = image.resize(
        (max(w, round(image.width * scale)), max(h, round(image.height * scale))), resample
    )
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


def compose(layout: Layout, image: Image.Image, maps: Sequence[Image.Image]) -> Image.Image:
    """The grid of a panel-sized ``image`` and its panel-sized ``maps`` (in ``layout.maps`` order)."""
    if len(maps) != len(layout.maps):
        raise ConfigError(f"layout {layout.name} takes {len(layout.maps)} map(s), got {len(maps)}")
    pw, ph = image.size
    grid = Image.new("RGB", (pw * layout.cols, ph * layout.rows))
    boxes = panel_boxes(layout, (pw, ph))
    grid.paste(image.convert("RGB"), boxes[layout.image][:2])
    for cell, panel in zip(layout.maps, maps, strict=True):
        grid.paste(panel.convert("RGB").resize((pw, ph)) if panel.size != (pw, ph) else panel.convert("RGB"),
                   boxes[cell][:2])  # fmt: skip
    return grid


# --- captions ----------------------------------------------------------------------------------


def grid_fill(layout: Layout, kinds: Sequence[str]) -> dict[str, dict[str, str]]:
    """The Template C fill-ins of a grid per language (``{"en": {...}, "zh": {...}}``)."""
    names = PANEL_NAMES[(layout.rows, layout.cols)]
    fill: dict[str, dict[str, str]] = {}
    for lang in LANGUAGES:
        where = {"panels": layout.panels, "panel_b": names[layout.image][lang]}
        if layout.panels == "dual":
            where |= {"panel_a": names[layout.maps[0]][lang], "panel_kind": KIND_NAMES[kinds[0]][lang]}
        elif lang == "zh":
            clauses = [
                f"{names[c][lang]}显示{KIND_NAMES[k][lang]}" for c, k in zip(layout.maps, kinds, strict=True)
            ]
            where["panel_maps"] = "，".join(clauses)
        else:
            clauses = [
                f"the {names[c][lang]} displays a {KIND_NAMES[k][lang]}"
                for c, k in zip(layout.maps, kinds, strict=True)
            ]
            where["panel_maps"] = ", ".join(clauses[:-1]) + " and " + clauses[-1]
        fill[lang] = where
    return fill


def _json_cell(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def grid_caption_texts(row: Mapping[str, Any]) -> list[str]:
    """The training texts of a grid row: each caption with Template C and its language's fill-ins
    (the English fill-ins and template for a language without its own)."""
    fill = _json_cell(row["grid_fill"])
    return [apply_grid_fills(c["text"], fill, c["language"]) for c in _json_cell(row["captions"])]


# --- building ----------------------------------------------------------------------------------


def _row_objects(row: Mapping[str, Any], image_root: Path | None) -> list | None:
    """A synthetic row's scene objects: its ``objects`` cell, else the ``metadata.jsonl`` entry
    beside its (local) image file; ``None`` when it has neither."""
    if row.get("objects") is not None and not (isinstance(row["objects"], float)):
        return scene_objects(row["objects"])
    path = row.get("source_path")  # the ingested file (pipeline rows read from shards carry it)
    if not isinstance(path, str) or not path:
        path = None if row.get("shard") else row.get("image_path")
    if row.get("domain") != "synthetic" or not isinstance(path, str) or not path:
        return None
    from components.recaption.backends import metadata_entry

    full = Path(path) if Path(path).is_absolute() or image_root is None else image_root / path
    entry = metadata_entry(str(full))
    return scene_objects(entry["objects"]) if entry and entry.get("objects") else None


def _prepared(
    annotators: list[Annotator], config: GridConfig, not_run: dict[str, str]
) -> dict[str, Annotator]:
    """Kind → annotator for the weighted kinds, the model ones loaded (a failing one is not run)."""
    by_kind: dict[str, Annotator] = {}
    for annotator in annotators:
        if config.kinds.get(annotator.kind, 0.0) <= 0 or annotator.kind in by_kind:
            continue
        if annotator.prepare is not None:
            try:
                annotator.prepare()
            except (LuminaError, OSError) as exc:
                not_run[annotator.name] = f"not run: {first_line(exc)}"
                log.warning("annotator %s not run: %s", annotator.name, first_line(exc))
                continue
        by_kind[annotator.kind] = annotator
    return by_kind


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "image"


def build_grids(
    manifest_rows: Iterable[Mapping[str, Any]] | pd.DataFrame,
    out_dir: str | Path,
    config: GridConfig | Mapping[str, Any] | None = None,
    image_root: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Grid samples of manifest rows (the tier manifests' schema; images by shard ref or
    ``image_path``, relative ones under ``image_root``): writes the PNGs, ``grids.parquet`` and
    ``grids.json`` into ``out_dir`` and returns the grid rows (see the module docstring). A row
    without a usable kind, or a grid row, makes no grid; an unreadable image is a
    :class:`ConfigError` naming the row."""
    config = grid_config(config)
    rows = (
        manifest_rows.to_dict("records") if isinstance(manifest_rows, pd.DataFrame) else list(manifest_rows)
    )
    root = Path(image_root) if image_root is not None else None
    out = Path(out_dir)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    offered, not_run = registry.lookup(config.weights)
    annotators = _prepared(list(offered.values()), config, not_run)
    plain = {
        k: a for k, a in annotators.items() if not a.needs_weights
    }  # what synthetic rows add to ground truth
    rng = random.Random(config.seed)
    grids: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for row in rows:
        if config.max_grids is not None and len(grids) >= config.max_grids:
            break
        rid = str(row.get("id", ""))
        if row.get("domain") == GRID_DOMAIN:
            skipped["already a grid"] += 1
            continue
        captions = _json_cell(row.get("captions")) or []
        if not captions:
            skipped["no captions"] += 1
            continue
        objects = _row_objects(row, root) if config.ground_truth else None
        sources: dict[str, Annotator | str] = dict(annotators)
        if objects is not None:
            sources = {**plain, **dict.fromkeys(GROUND_TRUTH_KINDS, GROUND_TRUTH)}
        picked = choose_grid(rng, sources, config)
        if picked is None:
            skipped["no map kind"] += 1
            continue
        layout, kinds = picked
        source_row = dict(row)
        shard = source_row.get("shard")
        if shard and root is not None and not is_s3(str(shard)) and not Path(str(shard)).is_absolute():
            source_row["shard"] = str(root / str(shard))  # as training resolves a relative shard
        try:
            image = decode_image(image_bytes(source_row, root))
        except LuminaError as exc:
            raise ConfigError(f"grid source {rid}: {first_line(exc)}") from None
        except Exception as exc:  # PIL raises several types for a corrupt image
            raise ConfigError(f"grid source {rid}: cannot decode image: {first_line(exc)}") from None
        (grid_w, grid_h), panel = grid_size(layout, image.size, config.resolution)
        panel_image = fit_image(image, panel)
        truth = (
            ground_truth_maps(fit_objects(objects, image.size, panel), panel) if objects is not None else {}
        )
        maps, provenance = [], {}
        for kind in kinds:
            source = sources[kind]
            if source == GROUND_TRUTH:
                maps.append(truth[kind])
                provenance[kind] = GROUND_TRUTH
            else:
                maps.append(source(panel_image))
                provenance[kind] = f"{source.name}@{source.version}"
        name = f"{_safe_name(rid)}.{layout.name}.{'-'.join(kinds)}.png"
        compose(layout, panel_image, maps).save(out / IMAGES / name)
        grids.append({
            "id": f"{rid}.grid.{layout.name}.{'-'.join(kinds)}", "image_path": f"{IMAGES}/{name}",
            "domain": GRID_DOMAIN, "captions": json.dumps(captions, ensure_ascii=False),
            "system_prompt": str(SystemPrompt.C), "score": row.get("score"),
            "width": grid_w, "height": grid_h,
            "shard": None, "member": None, "offset": None, "size": None,
            "text_rich": bool(row.get("text_rich") or False), "split": row.get("split") or "train",
            "grid_layout": layout.name, "grid_kind": ",".join(kinds),
            "grid_fill": json.dumps(grid_fill(layout, kinds), ensure_ascii=False), "grid_source": rid,
            "grid_maps": json.dumps(provenance),
        })  # fmt: skip
    _write(out, grids, offered, not_run, skipped, config)
    return grids


def _write(
    out: Path,
    grids: list[dict[str, Any]],
    offered: dict[str, Annotator],
    not_run: dict[str, str],
    skipped: Counter[str],
    config: GridConfig,
) -> None:
    from components.tier.tier import TRAIN_COLUMNS

    pd.DataFrame(grids, columns=[*TRAIN_COLUMNS, *GRID_COLUMNS]).to_parquet(out / MANIFEST, index=False)
    summary = {
        "grids": len(grids),
        "layouts": dict(Counter(g["grid_layout"] for g in grids)),
        "kinds": dict(Counter(k for g in grids for k in g["grid_kind"].split(","))),
        "annotators": {n: a.version for n, a in offered.items() if n not in not_run},
        "not_run": not_run,
        "skipped": dict(skipped),
        "config": config.model_dump(),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
