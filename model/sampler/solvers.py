"""ODE solvers for flow models in model time ``t = 1 - sigma`` (0 = noise, 1 = data).

An optional ``step_hook(x, t)`` may change the latents after every step (``t`` is their time).

Each solver walks a decreasing noise-level schedule with a velocity function ``v(x, t)`` (the
model's prediction of ``x1 - x0``). Flow-DPM-Solver is DPM-Solver++(2M) written for the flow
path ``x = (1 - sigma) * x1 + sigma * x0``, whose data prediction is ``x + sigma * v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum

import torch

VelocityFn = Callable[[torch.Tensor, float, int], torch.Tensor]  # (x, t, step index) -> v
# (x after a step, its model time t) -> x; e.g. keeping a known panel (model/sampler/conditioning.py)
StepHook = Callable[[torch.Tensor, float], torch.Tensor]


class Solver(StrEnum):
    EULER = "euler"
    MIDPOINT = "midpoint"
    FLOW_DPM = "flow_dpm"


def calls_per_step(solver: Solver) -> int:
    """Model evaluations per step (midpoint needs two)."""
    return 2 if solver is Solver.MIDPOINT else 1


def euler(
    v: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    progress: Callable[[], None],
    step_hook: StepHook | None = None,
) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        t, t_next = 1.0 - float(sigmas[i]), 1.0 - float(sigmas[i + 1])
        x = x + (t_next - t) * v(x, t, i)
        if step_hook is not None:
            x = step_hook(x, t_next)
        progress()
    return x


def midpoint(
    v: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    progress: Callable[[], None],
    step_hook: StepHook | None = None,
) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        t, t_next = 1.0 - float(sigmas[i]), 1.0 - float(sigmas[i + 1])
        dt = t_next - t
        x_mid = x + 0.5 * dt * v(x, t, i)
        x = x + dt * v(x_mid, t + 0.5 * dt, i)
        if step_hook is not None:
            x = step_hook(x, t_next)
        progress()
    return x


def _lambda(sigma: float) -> float:
    """Half log-SNR of the flow path, ``log((1 - sigma) / sigma)``."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log((1.0 - sigma) / sigma)


def flow_dpm_solver(
    v: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    progress: Callable[[], None],
    step_hook: StepHook | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) multistep; first order on the first step, the step after ``sigma = 1``
    and the final step to ``sigma = 0`` (lower-order final step, as DPM-Solver++ recommends)."""
    prev_x0: torch.Tensor | None = None
    prev_h: float | None = None
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = x + s * v(x, 1.0 - s, i)
        if s_next <= 0.0:
            x = x0
        else:
            h = _lambda(s_next) - _lambda(s)
            alpha_next = 1.0 - s_next
            # exp(-h) written without the infinite log-SNR at sigma = 1.
            exp_neg_h = (s_next / alpha_next) * ((1.0 - s) / s)
            d = x0
            if prev_x0 is not None and prev_h is not None and math.isfinite(prev_h) and math.isfinite(h):
                r = prev_h / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * prev_x0
            x = (s_next / s) * x + alpha_next * (1.0 - exp_neg_h) * d
            prev_h = h
        prev_x0 = x0
        if step_hook is not None:
            x = step_hook(x, 1.0 - s_next)
        progress()
    return x


SOLVERS: dict[Solver, Callable[..., torch.Tensor]] = {
    Solver.EULER: euler,
    Solver.MIDPOINT: midpoint,
    Solver.FLOW_DPM: flow_dpm_solver,
}
