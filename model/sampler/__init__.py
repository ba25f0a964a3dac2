"""Our Lumina2 sampler (see :class:`LuminaSampler`)."""

from model.sampler.sampler import GenerationResult, LuminaSampler, SamplerConfig
from model.sampler.solvers import Solver

__all__ = ["GenerationResult", "LuminaSampler", "SamplerConfig", "Solver"]
