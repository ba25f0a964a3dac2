"""Parameter counting without allocating weights (meta device)."""

from __future__ import annotations

import torch
from diffusers import Lumina2Transformer2DModel

from model.profiles import ModelProfile


def count_transformer_params(profile: ModelProfile) -> int:
    """Parameters of the profile's transformer, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        transformer = Lumina2Transformer2DModel(**profile.transformer.model_dump())
    return sum(p.numel() for p in transformer.parameters())
