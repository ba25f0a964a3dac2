"""A model card for a registered version: what the model is, what it was trained on, how it
scored, why it was or was not promoted, and how to load it. It becomes the model version's
description in the MLflow registry (Markdown) and ``model_card.md`` in the registration run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:
    from components.register.register import GateResult

TEST_PROFILES = ("tiny", "small")
_TRAINING_TAGS = (
    ("profile", "model profile"),
    ("data_version", "DVC data version"),
    ("dataset_hash", "ingest dataset hash"),
    ("captions_hash", "captions hash"),
    ("tiers_hash", "tiers hash"),
    ("run.lowres", "stage 1 run (low-res pretraining)"),
    ("run.highres", "stage 2 run (high-res)"),
    ("run.hq", "stage 3 run (HQ tuning)"),
    ("run.evaluate", "evaluation run"),
    ("git_sha", "code (git sha)"),
)


def transformer_summary(model_dir: Path) -> dict[str, int | str]:
    """The transformer's class, width, depth and parameter count (from the safetensors headers:
    no weights are loaded)."""
    folder = model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    params = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                params += count
    return {
        "class": str(config.get("_class_name", "unknown")),
        "hidden_size": int(config.get("hidden_size", 0)),
        "layers": int(config.get("num_layers", 0)),
        "parameters": params,
    }


def _params(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _comparison(gate: GateResult | None, champion_version: str) -> list[str]:
    """The promotion section's comparison with the champion: notes, then a table of deltas."""
    if gate is None:
        return []
    if not gate.has_champion:
        return ["- no current champion to compare with"]
    champion = f"champion v{champion_version}" if champion_version else "champion"
    lines = [f"- {note}" for note in gate.notes]
    if not gate.deltas:
        return [*lines, f"- no metric to compare with the {champion}"]
    lines += [
        "",
        f"Against the {champion} (Δ = this version − champion):",
        "",
        f"| metric | this version | {champion} | Δ | Δ % |",
        "|---|---|---|---|---|",
    ]
    for d in gate.deltas:
        relative = f"{d.relative:+.2f}%" if d.relative is not None else "n/a"
        lines.append(f"| {d.metric} | {d.challenger:.6g} | {d.champion:.6g} | {d.delta:+.6g} | {relative} |")
    return lines


def model_card(
    name: str,
    version: str,
    model_dir: Path,
    metrics: dict[str, float],
    tags: dict[str, str],
    aliases: list[str],
    reasons: list[str],
    gate: GateResult | None = None,
    champion_version: str = "",
) -> str:
    """The card as Markdown. ``gate`` (the gate's result) adds what could not be compared and the
    deltas against the champion ``champion_version`` it was checked with."""
    summary = transformer_summary(model_dir)
    lines = [
        f"# {name} v{version}",
        "",
        "A Lumina-Image 2.0-style text-to-image model (Unified Next-DiT, flow matching) trained by "
        "lumina-pipeline through the paper's three stages.",
        "",
        "## Model",
        "",
        f"- transformer: `{summary['class']}`, hidden size {summary['hidden_size']}, "
        f"{summary['layers']} layers, {_params(int(summary['parameters']))} parameters",
        "- format: diffusers pipeline folder (transformer, VAE, text encoder, tokenizer, scheduler)",
        "",
        "## Training",
        "",
    ]
    lines += [f"- {label}: `{tags[key]}`" for key, label in _TRAINING_TAGS if tags.get(key)]
    lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.6g} |" for key, value in sorted(metrics.items())]
    lines += ["", "## Promotion", ""]
    lines.append(f"- aliases: {', '.join(f'`{a}`' for a in aliases)}")
    lines.append("- promoted to `champion`" if not reasons else "- not promoted: " + "; ".join(reasons))
    lines += _comparison(gate, champion_version)
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"python -m serving --model models:/{name}/{version}      # HTTP server",
        "python -m model sample --model <folder from serving.fetch> --prompt '...'",
        "```",
        "",
        "## Data and limitations",
        "",
        "The training data is the DVC version above; each source folder of it carries its "
        "`SOURCES.md` and `LICENSE` (e.g. GPL-2 Tux Paint stamps, CC0 / public-domain / CC-BY "
        "photographs): check them before distributing the weights. Scores come from the evaluation "
        "run; benchmark scorers that need weights not present at evaluation time are reported there "
        "as not run.",
    ]
    profile = tags.get("profile", "")
    if profile in TEST_PROFILES:
        lines += [
            "",
            f"Built with the `{profile}` profile: its VAE and text encoder are random weights made "
            "from configs (no hub weights offline), so its images are not pictures; what it learned is "
            "measured by the flow-matching validation loss.",
        ]
    return "\n".join(lines) + "\n"
