"""Aesthetic: the LAION improved-aesthetic MLP on CLIP image embeddings (:mod:`components.clip`),
higher is better; offered only when ``LUMINA_CLIP_MODEL`` and ``LUMINA_AESTHETIC_MLP`` are set
(the weights do not ship with any package)."""

from __future__ import annotations

import functools
import os

from PIL import Image

from common.errors import WeightsNotFoundError
from components.tier.registry import Scorer

AESTHETIC_ENV = ("LUMINA_CLIP_MODEL", "LUMINA_AESTHETIC_MLP")


@functools.lru_cache(maxsize=1)
def aesthetic_predictor():
    """The LAION improved-aesthetic MLP on the CLIP given by ``LUMINA_CLIP_MODEL`` (e.g. a local
    copy of openai/clip-vit-large-patch14) with the head at ``LUMINA_AESTHETIC_MLP``."""
    from components.clip import AestheticPredictor, ClipScorer

    clip_source, mlp = (os.environ.get(k, "") for k in AESTHETIC_ENV)
    if not clip_source or not mlp:
        raise WeightsNotFoundError(f"aesthetic scorer needs {' and '.join(AESTHETIC_ENV)}")
    return AestheticPredictor(ClipScorer(clip_source), mlp)


def aesthetic(image: Image.Image, row: dict) -> float:
    return float(aesthetic_predictor()([image])[0])


def scorers() -> list[Scorer]:
    """The aesthetic scorer when both environment variables are set (looked at on each call)."""
    if not all(os.environ.get(k) for k in AESTHETIC_ENV):
        return []
    return [
        Scorer(
            "aesthetic",
            "1+laion-improved-aesthetic-mlp",
            aesthetic,
            description="LAION improved-aesthetic MLP on CLIP image embeddings (weights given by env)",
            prepare=aesthetic_predictor,
        )
    ]
