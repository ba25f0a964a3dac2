"""Tier step: score every captioned image, split into nested tiers, write one training manifest
per tier (``lowres.parquet`` ⊇ ``highres.parquet`` ⊇ ``hq.parquet``), the routed ``text.parquet``
(text-rich images of the pool, see :mod:`components.tier.tiering`), the ``heldout.parquet`` evaluation
manifest (same schema; images disjoint from every tier by id, :func:`~components.tier.tiering.heldout_split`;
every manifest and ``scores.parquet`` carry the ``split`` column), plus ``scores.parquet`` and a
report (``report/tiers.json``, score histograms as PNG).

Fan-out: :func:`score_group` scores one group's images (raw scores need nothing global);
:func:`tier_groups` is the fan-in: percentile ranks, the combined score and the 100:10:1 quotas are
computed over the whole set, so the tiers are global, not per group. :func:`run_tier` does both in
one process. Training manifests keep each image's shard reference (``shard``, ``member``,
``offset``, ``size``); no image is copied.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from common.errors import ConfigError, LuminaError, error_summary, first_line
from components.plan.plan import Group
from components.tier.registry import Scorer, available
from components.tier.tiering import (
    HELDOUT,
    TEXT_TIER,
    TIERS,
    TierConfig,
    assign_tiers,
    heldout_split,
    quality_score,
    text_rich,
    text_tier,
)
from model.prompts import domain_template
from storage import join, write_parquet
from storage.shards import REF_COLUMNS, image_bytes

log = logging.getLogger(__name__)
TRAIN_COLUMNS = ["id", "image_path", "domain", "captions", "system_prompt", "score", "width", "height",
                 *REF_COLUMNS, "text_rich", "split"]  # fmt: skip
SCORES_FILE, SCORERS_FILE = "scores.parquet", "scorers.json"


@dataclass
class TierResult:
    out_dir: Path
    counts: dict[str, int]
    dataset_hash: str
    report: Path
    heldout: int = 0  # images in heldout.parquet (never in a tier)


def score_images(
    manifest: pd.DataFrame, image_root: Path | None, scorers: list[Scorer], progress: bool = True
) -> pd.DataFrame:
    """One row per image with a column per scorer. An unreadable image, or one a scorer fails on
    (e.g. a ``cv2.error`` or an ONNX runtime error on an odd input), is reported, not scored."""
    rows = []
    for row in tqdm(manifest.to_dict("records"), desc="scoring", disable=not progress, leave=False):
        entry = {"id": row["id"], "error": None}
        rows.append(entry)
        try:
            with Image.open(io.BytesIO(image_bytes(row, image_root))) as img:
                img.load()
                image = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, LuminaError) as exc:
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


def _read_captioned(captions_dir: Path) -> pd.DataFrame:
    manifest_path = captions_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise ConfigError(f"captioned manifest not found: {manifest_path}")
    return pd.read_parquet(manifest_path)


def score_group(
    captions_dir: str | Path,
    out_dir: str | Path,
    scorer_names: list[str] | None = None,
    progress: bool = True,
    image_root: str | Path | None = None,
) -> Path:
    """Score the captioned images of one group (a recaption output folder) into
    ``out_dir/scores.parquet`` (``error`` set for an image that could not be scored) and
    ``scorers.json`` (versions, direction, and the scorers that could not run, with why)."""
    captions_dir, out = Path(captions_dir), Path(out_dir)
    manifest = _read_captioned(captions_dir)
    scorers, not_run = prepared(available(scorer_names))
    root = Path(image_root) if image_root is not None else None
    scores = score_images(manifest, root, scorers, progress)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(out / SCORES_FILE, index=False)
    meta = {"scorers": [{"name": s.name, "version": s.version, "higher_is_better": s.higher_is_better}
                        for s in scorers], "not_run": not_run, "images": len(manifest)}  # fmt: skip
    (out / SCORERS_FILE).write_text(json.dumps(meta, indent=2))
    return out / SCORES_FILE


def run_tier(
    captions_dir: str | Path,
    image_root: str | Path | None,
    out_dir: str | Path,
    config: TierConfig | None = None,
    scorer_names: list[str] | None = None,
    progress: bool = True,
) -> TierResult:
    """Score and tier the recaption output in one process (``image_root``: where file-based image
    paths are relative to; sharded images need none)."""
    out = Path(out_dir)
    score_group(captions_dir, out / "scoring", scorer_names, progress, image_root)
    return tier_groups([captions_dir], [out / "scoring"], out, config)


def tier_groups(
    captions_dirs: list[str | Path],
    score_dirs: list[str | Path],
    out_dir: str | Path,
    config: TierConfig | None = None,
    groups: Sequence[Group] | None = None,
) -> TierResult:
    """Fan-in: tier the union of the groups' captioned images with their scores, globally. With
    the plan's ``groups``, each group's tier membership is also written to
    ``<group prefix>/tiers.parquet`` for the per-group latent step."""
    config = config or TierConfig()
    out = Path(out_dir)
    manifest = pd.concat([_read_captioned(Path(d)) for d in captions_dirs], ignore_index=True)
    missing = [str(d) for d in score_dirs if not (Path(d) / SCORES_FILE).is_file()]
    if missing:
        raise ConfigError(f"tier fan-in: no scores in {missing[0]} (a scoring group failed or did not run)")
    scores = pd.concat([pd.read_parquet(Path(d) / SCORES_FILE) for d in score_dirs], ignore_index=True)
    metas = [json.loads((Path(d) / SCORERS_FILE).read_text()) for d in score_dirs]
    scorers = [ScorerInfo(**s) for s in metas[0]["scorers"]] if metas else []
    not_run = {k: v for m in metas for k, v in m["not_run"].items()}
    failed = scores[scores["error"].notna()]
    if len(failed) == len(manifest) and len(manifest):
        raise LuminaError(f"no image could be scored ({len(failed)} failed, e.g. {failed['error'].iloc[0]})")
    scored = manifest.merge(scores[scores["error"].isna()].drop(columns="error"), on="id")
    scored = scored.sort_values("id", kind="stable").reset_index(drop=True)  # independent of grouping
    for column in (*REF_COLUMNS, "image_path"):
        if column not in scored.columns:
            scored[column] = None
    lower = frozenset(s.name for s in scorers if not s.higher_is_better)
    scored["score"] = quality_score(scored, config, [s.name for s in scorers], lower)
    scored["text_rich"] = text_rich(scored, config)
    scored["system_prompt"] = [str(domain_template(d, config.system_prompts)) for d in scored["domain"]]
    scored["split"] = heldout_split(scored, config)
    held = scored["split"] == HELDOUT
    tiers = assign_tiers(scored[~held], config)
    heldout = assign_tiers(scored[held], config)["lowres"].sort_values("id", kind="stable")  # same gates
    text = text_tier(tiers)
    out.mkdir(parents=True, exist_ok=True)
    scored.to_parquet(out / SCORES_FILE, index=False)
    for name in TIERS:
        tiers[name][TRAIN_COLUMNS].to_parquet(out / f"{name}.parquet", index=False)
    text[TRAIN_COLUMNS].to_parquet(out / f"{TEXT_TIER}.parquet", index=False)
    heldout[TRAIN_COLUMNS].to_parquet(out / f"{HELDOUT}.parquet", index=False)
    if groups:
        write_group_tiers(scored, tiers, groups)
    hashes = {name: tier_hash(tiers[name]) for name in TIERS}
    if len(text):  # routing changes the training data; no key (the old hash) while nothing is routed
        hashes[TEXT_TIER] = tier_hash(text)
    if len(heldout):  # what evaluation runs on; no key (the old hash) while nothing is held out
        hashes[HELDOUT] = tier_hash(heldout)
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    excluded = scored[scored["nsfw"] > config.nsfw_threshold] if "nsfw" in scored.columns else scored.head(0)
    report = write_report(scored, tiers, failed, scorers, config, out / "report", not_run, excluded, heldout)
    counts = {name: len(tiers[name]) for name in TIERS}
    (out / "dataset.json").write_text(
        json.dumps({"dataset_hash": digest, "tiers": hashes, "counts": counts, HELDOUT: len(heldout)})
    )
    log.info("tiers: %s, %d held out (%d images not scored)", counts, len(heldout), len(failed))
    return TierResult(out, counts, digest, report, len(heldout))


GROUP_TIERS_FILE = "tiers.parquet"


def write_group_tiers(scored: pd.DataFrame, tiers: dict[str, pd.DataFrame], groups: Sequence[Group]) -> None:
    """``<group prefix>/tiers.parquet``: each group's tiered images with their shard refs, sizes and one
    boolean column per tier (what the group's latent task encodes, at which resolution), the
    captions and domain the latent index carries for the streaming training loader, and
    ``text_rich`` (the routing flag)."""
    members = {name: set(frame["id"]) for name, frame in tiers.items()}
    frame = scored[scored["id"].isin(members["lowres"])]
    columns = ["id", "group", "width", "height", "image_path", "domain", "captions", "text_rich",
               *REF_COLUMNS]  # fmt: skip
    for group in groups:
        part = frame[frame["group"] == group.name][columns].copy() if "group" in frame else frame.head(0)
        for name in TIERS:
            part[name] = part["id"].isin(members[name])
        write_parquet(part, join(group.prefix, GROUP_TIERS_FILE))


@dataclass(frozen=True)
class ScorerInfo:
    """What the fan-in needs of a scorer that ran in a group: name, version, direction."""

    name: str
    version: str
    higher_is_better: bool = True


def write_report(
    scored: pd.DataFrame,
    tiers: dict[str, pd.DataFrame],
    failed: pd.DataFrame,
    scorers: list[Scorer] | list[ScorerInfo],
    config: TierConfig,
    out: Path,
    not_run: dict[str, str] | None = None,
    nsfw_excluded: pd.DataFrame | None = None,
    heldout: pd.DataFrame | None = None,
) -> Path:
    """``tiers.json`` (counts, domains, text-rich counts, held-out images, scorer versions, config)
    and one histogram PNG per score."""
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
        "text_rich": {
            "scored": "text_density" in scored.columns,
            "threshold": config.text_rich_threshold,
            "counts": {n: int(tiers[n]["text_rich"].sum()) if "text_rich" in tiers[n] else 0 for n in TIERS},
            "manifest": f"{TEXT_TIER}.parquet",
        },
        HELDOUT: {
            "count": 0 if heldout is None else len(heldout),
            "domains": {} if heldout is None else heldout["domain"].value_counts().to_dict(),
            "fraction": config.heldout_fraction,
            "manifest": f"{HELDOUT}.parquet",
        },
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
