"""Hierarchical data tiers (paper Sec. 3.1): low-res pretrain ⊃ high-res ⊃ HQ tuning.

Every scorer's values are turned into percentile ranks, combined with weights, and the tiers are
the top fractions of the pretrain pool by that combined score, each with its own minimum side.

Two fairness rules (issue #13):

* **Caption scores are source-neutral.** A scorer in ``TierConfig.rank_within_source`` (by default
  ``caption_richness``) is ranked only among the images of the same *ranking group*: the same
  caption source (``caption_backend``, else ``domain``) and the same caption languages (``en``,
  ``zh``, ``en+zh``). Its rank is the centred percentile ``(rank - 0.5) / n`` within the group, so
  every group's ranks average exactly 0.5: a source (or language) whose captions are longer gains
  nothing over one whose captions are shorter; only being richer *than its peers* counts.
* **Text in an image never lowers its tier.** ``text_density`` (OCR) is a routing signal, not a
  quality score: it has no weight (a positive one is rejected), and images whose text density is at
  least ``TierConfig.text_rich_threshold`` are flagged ``text_rich`` in every tier manifest and
  listed in a ``text`` manifest, so training can oversample text-rendering data.

**Quality is ranked within a domain.** With ``TierConfig.stratify_by`` (default ``domain``) the
tiers are cut by each image's centred percentile of ``score`` among the images of its own domain,
so every domain keeps about its share of the pool in every tier. The scorers have no common scale
across domains (flat synthetic art has next to no texture for sharpness or NIQE to reward), and a
global cut would drop a whole domain, e.g. the synthetic scenes with their own system prompt, from
the high-resolution stages. ``stratify_by: null`` cuts by the global score.

**Held-out split** (issue #12): before the tiers are cut, :func:`heldout_split` sets aside a
``heldout`` split, disjoint from training by image id: an image is held out when the hash of its id
(``sha256(id)`` read as a fraction of 2**64) is below ``TierConfig.heldout_fraction``, so the same
id is always on the same side, whatever the grouping or order. A small set is topped up to
``min_heldout_images`` (and every domain, e.g. the synthetic scenes, to ``min_heldout_per_domain``)
with the lowest-hash eligible images, never past half the pool (or of a domain). The tiers are cut
from the ``train`` split only.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.tier.captions import caption_languages
from model.prompts import DOMAIN_TEMPLATES, SystemPrompt

TIERS = ("lowres", "highres", "hq")
HELDOUT = "heldout"
"""The evaluation split (``split`` column value and manifest name); the rest is ``train``."""
TEXT_TIER = "text"
"""The routed (not nested) manifest of text-rich images in the pretrain pool."""
ROUTING_SCORERS = frozenset({"text_density"})
"""Scores that route images (``text_rich``) and never count towards the quality score."""
SOURCE_COLUMNS = ("caption_backend", "domain")
"""Where an image's caption source is read from, first present column first."""


class TierConfig(BaseModel):
    """Tier ratios follow the paper's 100 : 10 : 1, with floors so a small set keeps usable tiers:
    a stage of a few hundred steps on 16 images only memorises them (the sample set's 173 training
    images give 128 high-res and 64 HQ images; from 1,280 / 6,400 images on the ratios rule)."""

    model_config = ConfigDict(extra="forbid")

    highres_ratio: float = Field(0.10, gt=0.0, le=1.0)
    hq_ratio: float = Field(0.01, gt=0.0, le=1.0)
    min_highres_images: int = Field(128, ge=1)
    min_hq_images: int = Field(64, ge=1)
    min_side: dict[str, int] = {"lowres": 64, "highres": 128, "hq": 128}
    weights: dict[str, float] = {
        "sharpness": 1.0,
        "exposure": 1.0,
        "contrast": 0.5,
        "colorfulness": 0.5,
        "resolution": 1.0,
        "caption_richness": 1.0,
        # model-based scorers count when installed (lower-is-better ones are inverted)
        "niqe": 1.0,
        "brisque": 0.5,
        "caption_language": 0.5,
        "aesthetic": 2.0,
    }
    nsfw_threshold: float = Field(0.5, ge=0.0, le=1.0, description="images scoring above are excluded")
    rank_within_source: list[str] = Field(
        default_factory=lambda: ["caption_richness"],
        description="scores ranked only among images of the same caption source and languages",
    )
    text_rich_threshold: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="text_density (fraction of the image covered by readable text) at or above "
        "which an image is text_rich: flagged and routed to the text manifest, never penalised",
    )
    system_prompts: dict[str, SystemPrompt] = Field(default_factory=lambda: dict(DOMAIN_TEMPLATES))
    stratify_by: str | None = Field(
        "domain",
        description="column whose values keep their share of the pool in every tier (quality is"
        " ranked within each value); None: one global ranking",
    )
    heldout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of images (by a hash of the id) held out of training"
    )
    min_heldout_images: int = Field(4, ge=0, description="held-out images at least (small sets)")
    min_heldout_per_domain: int = Field(
        2, ge=0, description="held-out images at least per domain (e.g. the synthetic scenes)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> TierConfig:
        if self.hq_ratio > self.highres_ratio:
            raise ValueError("hq_ratio must not exceed highres_ratio (tiers are nested)")
        if set(self.min_side) != set(TIERS):
            raise ValueError(f"min_side needs exactly the tiers {', '.join(TIERS)}")
        weighted = sorted(k for k in ROUTING_SCORERS if self.weights.get(k, 0.0) > 0)
        if weighted:
            raise ValueError(
                f"{', '.join(weighted)} routes images (text_rich_threshold), it is not a quality "
                "score: text in an image must not lower its tier, so give it no weight"
            )
        return self


def combined_score(
    scores: pd.DataFrame,
    weights: dict[str, float],
    lower_is_better: frozenset[str] = frozenset(),
    within: dict[str, pd.Series] | None = None,
) -> pd.Series:
    """Weighted mean of percentile ranks (0–1, 1 = best) of the weighted scorers in ``scores``;
    a scorer in ``lower_is_better`` (e.g. BRISQUE, NIQE) ranks its smallest values highest.

    A scorer in ``within`` (column name -> a group key per row) is ranked only among the rows of
    its group, by the centred percentile ``(rank - 0.5) / n``: every group's ranks then average
    0.5, so no group is favoured as a whole. Routing scores (:data:`ROUTING_SCORERS`) never count."""
    within = within or {}
    used = {k: w for k, w in weights.items() if k in scores.columns and w > 0 and k not in ROUTING_SCORERS}
    if not used:
        return pd.Series(np.zeros(len(scores)), index=scores.index)
    total = pd.Series(np.zeros(len(scores)), index=scores.index)
    for k, w in used.items():
        ascending = k not in lower_is_better
        if k in within:
            grouped = scores[k].groupby(within[k].reindex(scores.index), dropna=False)
            rank = grouped.rank(method="average", ascending=ascending)
            rank = (rank - 0.5) / grouped.transform("size")
        else:
            rank = scores[k].rank(pct=True, method="average", ascending=ascending)
        total += rank * w
    return total / sum(used.values())


def caption_source(frame: pd.DataFrame) -> pd.Series:
    """Each row's caption source: ``caption_backend`` (how it was captioned: VLM, metadata, alt
    text), else ``domain``, else one source for all."""
    source = pd.Series([""] * len(frame), index=frame.index, dtype=object)
    for column in reversed(SOURCE_COLUMNS):  # the first present column wins
        if column in frame.columns:
            source = frame[column].where(frame[column].notna(), source).astype(str)
    return source


def ranking_groups(frame: pd.DataFrame, config: TierConfig) -> dict[str, pd.Series]:
    """``rank_within_source`` scorer -> its ranking group per row: caption source and the caption
    languages (``"vlm|en+zh"``), from the ``captions`` JSON column when the frame has one."""
    if "captions" in frame.columns:
        languages = frame["captions"].map(caption_languages)
    else:
        languages = pd.Series([""] * len(frame), index=frame.index)
    key = caption_source(frame) + "|" + languages.astype(str)
    return {name: key for name in config.rank_within_source if name in frame.columns}


def quality_score(
    frame: pd.DataFrame, config: TierConfig, scorers: list[str], lower_is_better: frozenset[str]
) -> pd.Series:
    """The combined score the tiers are cut by: :func:`combined_score` of the ``scorers`` columns
    with the config's weights and the source-neutral ranking groups (:func:`ranking_groups`)."""
    return combined_score(frame[scorers], config.weights, lower_is_better, ranking_groups(frame, config))


def text_rich(frame: pd.DataFrame, config: TierConfig) -> pd.Series:
    """``text_density >= text_rich_threshold`` per row; all False when text density was not scored
    (the report says so)."""
    if "text_density" not in frame.columns:
        return pd.Series(np.zeros(len(frame), dtype=bool), index=frame.index)
    return frame["text_density"].fillna(0.0).ge(config.text_rich_threshold).astype(bool)


def assign_tiers(frame: pd.DataFrame, config: TierConfig) -> dict[str, pd.DataFrame]:
    """Nested tiers from a frame with ``score``, ``width``, ``height`` (and optional ``nsfw``).

    Ties are broken by ``id`` so the result is deterministic."""
    pool = frame
    if "nsfw" in pool.columns:
        pool = pool[pool["nsfw"] <= config.nsfw_threshold]
    side = pool[["width", "height"]].min(axis=1)
    pool = pool[side >= config.min_side["lowres"]]
    order = tier_order(pool, config.stratify_by)
    pool = pool.assign(_order=order).sort_values(["_order", "id"], ascending=[False, True])
    pool = pool.drop(columns="_order")
    n = len(pool)
    n_high = min(n, max(math.ceil(config.highres_ratio * n), config.min_highres_images))
    n_hq = min(n_high, max(math.ceil(config.hq_ratio * n), config.min_hq_images))
    eligible_high = pool[pool[["width", "height"]].min(axis=1) >= config.min_side["highres"]]
    high = eligible_high.head(n_high)
    eligible_hq = high[high[["width", "height"]].min(axis=1) >= config.min_side["hq"]]
    hq = eligible_hq.head(n_hq)
    return {"lowres": pool, "highres": high, "hq": hq}


def tier_order(pool: pd.DataFrame, stratify_by: str | None) -> pd.Series:
    """What the tiers are cut by: ``score``, or with ``stratify_by`` (a column of ``pool``) the
    centred percentile of ``score`` within the rows of the same value (ties by id), so each value's
    rows spread evenly over (0, 1) and a top-fraction cut takes about that fraction of each."""
    if stratify_by is None or stratify_by not in pool.columns or pool.empty:
        return pool["score"]
    by_id = pool.sort_values("id", kind="stable")  # equal scores: the lower id ranks higher, so
    grouped = by_id["score"].groupby(by_id[stratify_by].astype(str), dropna=False)  # domains alternate
    rank = grouped.rank(method="first", ascending=False)  # 1 = best, unique within a domain
    return (1.0 - (rank - 0.5) / grouped.transform("size")).reindex(pool.index)


def id_fraction(image_id: str) -> float:
    """``sha256(id)`` as a number in [0, 1): where the id falls for the held-out split."""
    return int.from_bytes(hashlib.sha256(str(image_id).encode()).digest()[:8], "big") / 2.0**64


def _eligible(frame: pd.DataFrame, config: TierConfig) -> pd.Series:
    """The rows the lowres tier could take (NSFW and size gates of :func:`assign_tiers`)."""
    keep = frame[["width", "height"]].min(axis=1) >= config.min_side["lowres"]
    if "nsfw" in frame.columns:
        keep &= frame["nsfw"] <= config.nsfw_threshold
    return keep


def heldout_split(frame: pd.DataFrame, config: TierConfig) -> pd.Series:
    """``"train"`` or ``"heldout"`` per row (``id``, ``width``, ``height``, optional ``domain`` and
    ``nsfw``): held out when the id's hash fraction is below ``heldout_fraction``; then topped up,
    lowest hash first among the eligible images, to ``min_heldout_images`` in all and
    ``min_heldout_per_domain`` per domain, at most half of the eligible pool (of the domain)."""
    fraction = frame["id"].map(id_fraction)
    held = fraction < config.heldout_fraction
    eligible = _eligible(frame, config)

    def top_up(rows: pd.Series, wanted: int) -> None:
        pool = rows & eligible
        need = min(wanted, int(pool.sum()) // 2) - int((held & pool).sum())
        if need > 0:
            candidates = fraction[pool & ~held].sort_values(kind="stable")
            held.loc[candidates.index[:need]] = True

    if "domain" in frame.columns:
        for domain in sorted(frame["domain"].dropna().astype(str).unique()):
            top_up(frame["domain"].astype(str) == domain, config.min_heldout_per_domain)
    top_up(pd.Series(True, index=frame.index), config.min_heldout_images)
    return held.map({True: HELDOUT, False: "train"})


def text_tier(tiers: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The text-rich images of the pretrain pool (they passed the NSFW and size gates), best score
    first: a routing list for oversampling text rendering, not a quality tier."""
    pool = tiers["lowres"]
    return pool[pool["text_rich"]] if "text_rich" in pool.columns else pool.head(0)
