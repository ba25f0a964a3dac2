"""Fit TeaCache's rescale polynomial for a model (``lumina calibrate-teacache``).

Runs full generations (nothing skipped) on calibration prompts, records for every model call the
relative L1 change of the first block's timestep-modulated input and of the main blocks' output,
and fits ``output_change ≈ poly(input_change)`` (degree 4, as TeaCache does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.errors import ConfigError
from model.sampler.denoiser import TeaCache
from model.sampler.sampler import TEACACHE_FILE, LuminaSampler, SamplerConfig
from model.sampler.solvers import calls_per_step

DEFAULT_PROMPTS = (
    "a red cat sitting on the left of a blue car",
    "three yellow apples on a wooden table",
    "a watercolor painting of a lighthouse at sunset",
    "a close-up photo of a green bird on a branch",
)


def collect_pairs(
    sampler: LuminaSampler,
    prompts: Sequence[str],
    *,
    height: int,
    width: int,
    config: SamplerConfig,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """(input change, output change) for every consecutive pair of model calls."""
    pairs: list[tuple[float, float]] = []
    for i, prompt in enumerate(prompts):
        cache = TeaCache(1.0, (0.0, 1.0), num_steps=config.steps * calls_per_step(config.solver), record=True)
        sampler.generate(
            prompt,
            height=height,
            width=width,
            seed=seed + i,
            config=config,
            output_type="latent",
            cache=cache,
        )
        pairs.extend(cache.history)
    return pairs


def fit_coefficients(pairs: Sequence[tuple[float, float]], degree: int = 4) -> list[float]:
    """Least-squares polynomial (highest power first) mapping input change to output change."""
    if len(pairs) <= degree:
        raise ConfigError(
            f"need more than {degree} calibration pairs, got {len(pairs)}: use more steps or prompts"
        )
    x, y = np.array(pairs, dtype=np.float64).T
    return [float(c) for c in np.polyfit(x, y, degree)]


def calibrate(
    sampler: LuminaSampler,
    *,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    height: int,
    width: int,
    config: SamplerConfig | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Calibrate, set the sampler's coefficients and optionally write ``teacache.json``."""
    config = config or SamplerConfig()
    pairs = collect_pairs(sampler, prompts, height=height, width=width, config=config)
    coefficients = fit_coefficients(pairs)
    sampler.teacache_coefficients = tuple(coefficients)
    x, y = np.array(pairs).T
    residual = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    result = {"coefficients": coefficients, "pairs": len(pairs), "rmse": residual, "steps": config.steps}
    if out_dir is not None:
        Path(out_dir, TEACACHE_FILE).write_text(json.dumps(result, indent=2))
    return result
