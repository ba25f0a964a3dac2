"""A stand-in velocity model for sampler tests."""

from __future__ import annotations

from model.sampler.denoiser import Lumina2Denoiser


class OracleDenoiser(Lumina2Denoiser):
    """Returns the exact velocity towards a fixed target, ``(target - x) / (1 - t)``. Each latent
    value is looked at alone: nothing flows between positions or panels."""

    def __init__(self, transformer, target):
        super().__init__(transformer)
        self.target = target

    def __call__(self, x, t, ctx, cache=None, branches=1):
        self.forward_calls += 1
        self.forward_rows += x.shape[0]
        target = self.target.repeat(x.shape[0] // self.target.shape[0], 1, 1, 1)
        return (target - x) / (1.0 - t)
