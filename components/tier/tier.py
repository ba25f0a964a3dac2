"""Tier step: score every captioned image, split into nested tiers, write one training manifest
per tier (``lowres.parquet`` ⊇ ``highres.parquet`` ⊇ ``hq.parquet``) plus ``scores.parquet`` and a
report (``report/tiers.json``, score histograms as PNG)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from components.tier.scorers import Scorer, available
from components.tier.tiering import TIERS, TierConfig, assign_tiers, combined_score
from model.errors import ConfigError, LuminaError, error_summary, first_line

log = logging.getLogger(__name__)
TRAIN_COLUMNS = ["id", "image_path", "domain", "captions", "system_prompt", "score", "width", "height"]


@dataclass
class TierResult:
    out_dir: Path
    counts: dict[str, int]
    dataset_hash: str
    report: Path


def score_images(
    manifest: pd.DataFrame, image_root: Path, scorers: list[Scorer], progress: bool = True
) -> pd.DataFrame:
    """One row per image with a column per scorer. An unreadable image, or one a scorer fails on
    (e.g. a ``cv2.error`` or an ONNX runtime error on an odd input), is reported, not scored."""
    rows = []
    for row in tqdm(manifest.to_dict("records"), desc="scoring", disable=not progress, leave=False):
        entry = {"id": row["id"], "error": None}
        rows.append(entry)
        try:
            with Image.open(image_root / row["image_path"]) as img:
                img.load()
                image = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            entry["error"] = error_summary(exc, 80)
            continue
        for scorer in scorers:
            try:
                entry[scorer.name] = scorer(image, row)
            except Exception as exc:  # one bad image must not end the step
                entry["error"] = f"scorer {scorer.name}: {error_summary(exc, 80)}"
                break
    return pd.DataFrame(rows)


def prepared(scorers: list[Scorer]) -> tuple[list[Scorer], dict[str, str]]:
    """Scorers whose weights could be loaded, and why the others are not run (never faked)."""
    ready, not_run = [], {}
    for scorer in scorers:
        try:
            if scorer.prepare is not None:
                scorer.prepare()
            ready.append(scorer)
        except LuminaError as exc:
            not_run[scorer.name] = first_line(exc)
            log.warning("scorer %s not run: %s", scorer.name, not_run[scorer.name])
    return ready, not_run


def tier_hash(frame: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(sorted(frame["id"])).encode()).hexdigest()


def run_tier(
    captions_dir: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    config: TierConfig | None = None,
    scorer_names: list[str] | None = None,
    progress: bool = True,
) -> TierResult:
    """Score and tier the recaption output; ``image_root`` is the ingest dataset folder."""
    config = config or TierConfig()
    captions_dir, image_root, out = Path(captions_dir), Path(image_root), Path(out_dir)
    manifest_path = captions_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise ConfigError(f"captioned manifest not found: {manifest_path}")
    manifest = pd.read_parquet(manifest_path)
    scorers, not_run = prepared(available(scorer_names))
    scores = score_images(manifest, image_root, scorers, progress)
    failed = scores[scores["error"].notna()]
    if len(failed) == len(manifest) and len(manifest):
        raise LuminaError(f"no image could be scored ({len(failed)} failed, e.g. {failed['error'].iloc[0]})")
    scored = manifest.merge(scores[scores["error"].isna()].drop(columns="error"), on="id")
    lower = frozenset(s.name for s in scorers if not s.higher_is_better)
    scored["score"] = combined_score(scored[[s.name for s in scorers]], config.weights, lower)
    scored["system_prompt"] = [str(config.system_prompts.get(d, "A")) for d in scored["domain"]]
    tiers = assign_tiers(scored, config)
    out.mkdir(parents=True, exist_ok=True)
    scored.to_parquet(out / "scores.parquet", index=False)
    for name in TIERS:
        tiers[name][TRAIN_COLUMNS].to_parquet(out / f"{name}.parquet", index=False)
    hashes = {name: tier_hash(tiers[name]) for name in TIERS}
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    excluded = scored[scored["nsfw"] > config.nsfw_threshold] if "nsfw" in scored.columns else scored.head(0)
    report = write_report(scored, tiers, failed, scorers, config, out / "report", not_run, excluded)
    counts = {name: len(tiers[name]) for name in TIERS}
    (out / "dataset.json").write_text(json.dumps({"dataset_hash": digest, "tiers": hashes, "counts": counts}))
    log.info("tiers: %s (%d images not scored)", counts, len(failed))
    return TierResult(out, counts, digest, report)


def write_report(
    scored: pd.DataFrame,
    tiers: dict[str, pd.DataFrame],
    failed: pd.DataFrame,
    scorers: list[Scorer],
    config: TierConfig,
    out: Path,
    not_run: dict[str, str] | None = None,
    nsfw_excluded: pd.DataFrame | None = None,
) -> Path:
    """``tiers.json`` (counts, domains, scorer versions, config) and one histogram PNG per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    columns = [s.name for s in scorers] + ["score"]
    for column in columns:
        fig, ax = plt.subplots(figsize=(4, 3))
        for name in TIERS:
            if len(tiers[name]):
                ax.hist(tiers[name][column], bins=20, alpha=0.5, label=f"{name} ({len(tiers[name])})")
        ax.set_title(column)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"hist_{column}.png", dpi=80)
        plt.close(fig)
    summary = {
        "counts": {name: len(tiers[name]) for name in TIERS},
        "domains": {name: tiers[name]["domain"].value_counts().to_dict() for name in TIERS},
        "scored": len(scored),
        "not_scored": failed[["id", "error"]].to_dict("records"),
        "scorers": {s.name: s.version for s in scorers},
        "scorers_not_run": not_run or {},
        "nsfw_excluded": [] if nsfw_excluded is None else nsfw_excluded["id"].tolist(),
        "config": json.loads(config.model_dump_json()),
        "score_summary": scored[columns].describe().round(4).to_dict(),
    }
    path = out / "tiers.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path
