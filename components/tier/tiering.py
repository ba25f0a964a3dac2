"""Hierarchical data tiers (paper Sec. 3.1): low-res pretrain ⊃ high-res ⊃ HQ tuning.

Every scorer's values are turned into percentile ranks, combined with weights, and the tiers are
the top fractions of the pretrain pool by that combined score, each with its own minimum side.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.prompts import DOMAIN_TEMPLATES, SystemPrompt

TIERS = ("lowres", "highres", "hq")


class TierConfig(BaseModel):
    """Tier ratios follow the paper's 100 : 10 : 1, with floors so a small set keeps usable tiers."""

    model_config = ConfigDict(extra="forbid")

    highres_ratio: float = Field(0.10, gt=0.0, le=1.0)
    hq_ratio: float = Field(0.01, gt=0.0, le=1.0)
    min_highres_images: int = Field(16, ge=1)
    min_hq_images: int = Field(8, ge=1)
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
        "text_density": 0.5,
        "caption_language": 0.5,
        "aesthetic": 2.0,
    }
    nsfw_threshold: float = Field(0.5, ge=0.0, le=1.0, description="images scoring above are excluded")
    system_prompts: dict[str, SystemPrompt] = Field(default_factory=lambda: dict(DOMAIN_TEMPLATES))

    @model_validator(mode="after")
    def _ordered(self) -> TierConfig:
        if self.hq_ratio > self.highres_ratio:
            raise ValueError("hq_ratio must not exceed highres_ratio (tiers are nested)")
        if set(self.min_side) != set(TIERS):
            raise ValueError(f"min_side needs exactly the tiers {', '.join(TIERS)}")
        return self


def combined_score(
    scores: pd.DataFrame, weights: dict[str, float], lower_is_better: frozenset[str] = frozenset()
) -> pd.Series:
    """Weighted mean of percentile ranks (0–1, 1 = best) of the weighted scorers in ``scores``;
    a scorer in ``lower_is_better`` (e.g. BRISQUE, NIQE) ranks its smallest values highest."""
    used = {k: w for k, w in weights.items() if k in scores.columns and w > 0}
    if not used:
        return pd.Series(np.zeros(len(scores)), index=scores.index)
    ranks = sum(
        scores[k].rank(pct=True, method="average", ascending=k not in lower_is_better) * w
        for k, w in used.items()
    )
    return ranks / sum(used.values())


def assign_tiers(frame: pd.DataFrame, config: TierConfig) -> dict[str, pd.DataFrame]:
    """Nested tiers from a frame with ``score``, ``width``, ``height`` (and optional ``nsfw``).

    Ties are broken by ``id`` so the result is deterministic."""
    pool = frame
    if "nsfw" in pool.columns:
        pool = pool[pool["nsfw"] <= config.nsfw_threshold]
    side = pool[["width", "height"]].min(axis=1)
    pool = pool[side >= config.min_side["lowres"]].sort_values(["score", "id"], ascending=[False, True])
    n = len(pool)
    n_high = min(n, max(math.ceil(config.highres_ratio * n), config.min_highres_images))
    n_hq = min(n_high, max(math.ceil(config.hq_ratio * n), config.min_hq_images))
    eligible_high = pool[pool[["width", "height"]].min(axis=1) >= config.min_side["highres"]]
    high = eligible_high.head(n_high)
    eligible_hq = high[high[["width", "height"]].min(axis=1) >= config.min_side["hq"]]
    hq = eligible_hq.head(n_hq)
    return {"lowres": pool, "highres": high, "hq": hq}
