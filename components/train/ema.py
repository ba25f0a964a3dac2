"""The exponential moving average of the trained transformer (the weights a stage exports)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import Lumina2Transformer2DModel


@contextlib.contextmanager
def whole_parameters(module: torch.nn.Module, zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3 gather the partitioned parameters for the block (read only); else nothing."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


class Ema:
    """Exponential moving average of the trainable parameters (fp32, whole tensors on every rank;
    under ZeRO-3 each update gathers the partitioned parameters)."""

    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int = 0):
        self.decay = decay
        self.zero_stage = zero_stage
        with whole_parameters(module, zero_stage):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        with whole_parameters(module, self.zero_stage):
            for name, param in module.named_parameters():
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(self.shadow[name].to(param.dtype))

    def model(self, like: Lumina2Transformer2DModel) -> Lumina2Transformer2DModel:
        """A fresh (unsharded) transformer with ``like``'s config and the EMA weights."""
        fresh = Lumina2Transformer2DModel.from_config(like.config).eval()
        self.copy_to(fresh)
        return fresh
