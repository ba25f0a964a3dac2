"""Noise-level schedules for flow sampling (``sigma = 1 - t``; sigma 1 is noise, 0 is data)."""

from __future__ import annotations

import math

import numpy as np
import torch

from model.flow import shift_mu, shift_sigma


def flow_sigmas(
    num_steps: int,
    *,
    shift: float = 1.0,
    dynamic_seq_len: int | None = None,
) -> torch.Tensor:
    """``num_steps + 1`` decreasing noise levels from 1 to 0 (float32).

    Uniform in sigma, then time-shifted: statically by ``shift`` (the released scheduler uses 6.0),
    or, with ``dynamic_seq_len``, by ``exp(mu)`` computed from the image token count. Matches
    diffusers' ``FlowMatchEulerDiscreteScheduler`` for the same settings.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    s = math.exp(shift_mu(dynamic_seq_len)) if dynamic_seq_len is not None else shift
    shifted = shift_sigma(torch.from_numpy(sigmas), s).to(torch.float32)
    return torch.cat([shifted, torch.zeros(1)])
