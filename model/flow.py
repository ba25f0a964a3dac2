"""Rectified-flow training objective of Lumina-Image 2.0.

Time convention (shared with the sampler and with diffusers' Lumina2 transformer): model time
``t`` in [0, 1], ``t = 0`` is pure noise and ``t = 1`` is data; ``x_t = t * x1 + (1 - t) * x0``
with ``x0 ~ N(0, I)``; the model predicts the velocity ``v = x1 - x0``. (diffusers' schedulers use
``sigma = 1 - t``.)

Timestep sampling follows the official trainer: ``t = sigmoid(u), u ~ N(0, 1)`` ("lognorm") or
uniform, then a resolution-dependent shift towards noise, ``mu`` linear in the image token count
(0.5 at 256 tokens, 1.15 at 4096 tokens); or (``static_shift``) one fixed shift ``s`` for every
resolution, as the sampler's scheduler applies at inference.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.errors import ConfigError

TimestepKind = Literal["lognorm", "uniform"]
# A velocity model: (x_t, t, cap_feats, cap_mask) -> v
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

AUX_POOL = 4


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` of the resolution-dependent shift, linear in the image token count (256 → 4096)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_seq_len - 256)


def shift_time(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Shift model time ``t`` (0 = noise) towards noise by ``exp(mu)``.

    In noise-level terms ``sigma = 1 - t``: ``sigma' = e^mu / (e^mu + 1/sigma - 1)``, which is
    the official ``time_shift(mu, 1.0, t)`` and the same map as a static shift ``s = e^mu``:
    ``sigma' = s * sigma / (1 + (s - 1) * sigma)``.
    """
    return 1.0 - shift_sigma(1.0 - t, math.exp(mu))


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Static time shift on noise levels: ``s * sigma / (1 + (s - 1) * sigma)``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Number of image tokens the transformer sees for a latent of this size."""
    return (latent_height // patch_size) * (latent_width // patch_size)


@dataclass(frozen=True)
class TimestepSampler:
    """Training-time distribution of model time ``t``."""

    kind: TimestepKind = "lognorm"
    shift: bool = True
    static_shift: float | None = None  # a fixed shift s in place of the resolution-dependent one

    def sample(self, n: int, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` times for images of ``seq_len`` tokens (on the CPU, float32)."""
        if self.kind == "lognorm":
            t = torch.sigmoid(torch.randn(n, generator=generator))
        elif self.kind == "uniform":
            t = torch.rand(n, generator=generator)
        else:
            raise ConfigError(f"unknown timestep sampling {self.kind!r}; choose lognorm or uniform")
        if self.static_shift is not None:
            return 1.0 - shift_sigma(1.0 - t, self.static_shift)
        if self.shift:
            t = shift_time(t, shift_mu(seq_len))
        return t


@dataclass
class FlowLoss:
    """The training loss and its parts (``aux`` is 0 when the auxiliary loss is off)."""

    loss: torch.Tensor
    main: torch.Tensor
    aux: torch.Tensor
    t: torch.Tensor


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point on the straight path from noise ``x0`` (t=0) to data ``x1`` (t=1)."""
    tt = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return tt * x1 + (1.0 - tt) * x0


def velocity_loss(
    model: VelocityFn,
    x1: torch.Tensor,
    cap_feats: torch.Tensor,
    cap_mask: torch.Tensor,
    t: torch.Tensor,
    x0: torch.Tensor,
) -> torch.Tensor:
    """Per-sample MSE between the model velocity at ``x_t`` and the target ``x1 - x0``."""
    xt = interpolate(x1, x0, t)
    pred = model(xt, t.to(x1.device, x1.dtype), cap_feats, cap_mask)
    return ((pred.float() - (x1 - x0).float()) ** 2).mean(dim=tuple(range(1, x1.dim())))


def pool_latents(x: torch.Tensor, factor: int = AUX_POOL) -> torch.Tensor:
    """Average-pool latents by ``factor`` (the paper's low-frequency auxiliary target)."""
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ConfigError(
            f"latent size {tuple(x.shape[-2:])} is not divisible by the aux-loss pool factor {factor}"
        )
    return F.avg_pool2d(x, kernel_size=factor)


def flow_matching_loss(
    model: VelocityFn,
    latents: torch.Tensor,
    cap_feats: torch.Tensor,
    cap_mask: torch.Tensor,
    *,
    sampler: TimestepSampler | None = None,
    aux_weight: float = 0.0,
    patch_size: int = 2,
    generator: torch.Generator | None = None,
) -> FlowLoss:
    """Flow-matching loss plus the optional auxiliary loss on 4x-average-pooled latents.

    As in the official trainer, the auxiliary term draws its own noise and times (with the shift
    of the full-resolution sequence length) and is added with ``aux_weight``.
    """
    sampler = sampler or TimestepSampler()
    n = latents.shape[0]
    seq_len = image_seq_len(latents.shape[-2], latents.shape[-1], patch_size)

    t = sampler.sample(n, seq_len, generator).to(latents.device)
    x0 = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    main = velocity_loss(model, latents, cap_feats, cap_mask, t, x0).mean()

    aux = torch.zeros((), device=latents.device)
    if aux_weight > 0:
        pooled = pool_latents(latents)
        if pooled.shape[-1] % patch_size or pooled.shape[-2] % patch_size:
            raise ConfigError(
                f"pooled latent size {tuple(pooled.shape[-2:])} is not divisible by patch size "
                f"{patch_size}; use a resolution divisible by {8 * AUX_POOL * patch_size}"
            )
        t_aux = sampler.sample(n, seq_len, generator).to(latents.device)
        x0_aux = torch.randn(pooled.shape, generator=generator).to(latents.device, latents.dtype)
        aux = velocity_loss(model, pooled, cap_feats, cap_mask, t_aux, x0_aux).mean()
    return FlowLoss(loss=main + aux_weight * aux, main=main, aux=aux, t=t)


def drop_captions(captions: Sequence[str], prob: float, rng: random.Random) -> list[str]:
    """Replace each caption by the empty string with probability ``prob`` (trains the CFG branch)."""
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"caption dropout probability must be in [0, 1], got {prob}")
    return ["" if rng.random() < prob else c for c in captions]


@torch.no_grad()
def validation_loss(
    model: VelocityFn,
    latents: torch.Tensor,
    cap_feats: torch.Tensor,
    cap_mask: torch.Tensor,
    *,
    times: Sequence[float] = (0.25, 0.5, 0.75),
    seed: int = 0,
) -> float:
    """Flow-matching loss at fixed times and fixed noise: comparable across checkpoints."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in times:
        x0 = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
        tt = torch.full((latents.shape[0],), float(t), device=latents.device)
        total += velocity_loss(model, latents, cap_feats, cap_mask, tt, x0).mean().item()
    return total / len(times)
