import math
import random

import pytest
import torch

from common.errors import ConfigError
from model.checkpoint import build_transformer
from model.flow import (
    TimestepSampler,
    drop_captions,
    flow_matching_loss,
    interpolate,
    shift_mu,
    shift_time,
    velocity_loss,
)
from model.profiles import get_profile


def official_time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """The official trainer's time_shift(mu, 1.0, t), written independently."""
    s = 1 - t
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return 1 - s


def test_shift_matches_official_formula_and_endpoints():
    t = torch.linspace(0.01, 0.99, 50)
    for seq_len in (64, 256, 1024, 4096):
        mu = shift_mu(seq_len)
        torch.testing.assert_close(shift_time(t, mu), official_time_shift(mu, t))
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)


def test_timestep_sampler_is_seeded_and_shifts_towards_noise():
    sampler = TimestepSampler("lognorm", shift=True)
    a = sampler.sample(4000, 4096, torch.Generator().manual_seed(0))
    b = sampler.sample(4000, 4096, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() > 0 and a.max() < 1
    low = sampler.sample(4000, 256, torch.Generator().manual_seed(0))
    unshifted = TimestepSampler("lognorm", shift=False).sample(4000, 4096, torch.Generator().manual_seed(0))
    assert a.mean() < low.mean() < unshifted.mean()  # more tokens -> more time near noise (t=0)
    assert abs(unshifted.mean().item() - 0.5) < 0.02
    with pytest.raises(ConfigError):
        TimestepSampler("cosine").sample(2, 256)  # type: ignore[arg-type]


def test_static_shift_ignores_the_token_count_and_matches_the_schedulers_map():
    """``static_shift=s``: the noise level sigma = 1 - t maps to s * sigma / (1 + (s - 1) * sigma)
    (diffusers' FlowMatchEulerDiscreteScheduler with ``shift=s``), whatever the token count."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    raw = TimestepSampler("lognorm", shift=False).sample(2000, 16, gen())
    six = TimestepSampler("lognorm", static_shift=6.0)
    small, large = six.sample(2000, 16, gen()), six.sample(2000, 4096, gen())
    assert torch.equal(small, large)
    sigma = 1 - raw
    torch.testing.assert_close(1 - small, 6 * sigma / (1 + 5 * sigma))
    official = TimestepSampler("lognorm").sample(2000, 16, gen())
    assert small.mean() < official.mean() < raw.mean()  # towards noise, further than at 16 tokens
    torch.testing.assert_close(TimestepSampler("lognorm", static_shift=1.0).sample(2000, 16, gen()), raw)


def test_velocity_target_and_interpolation_convention():
    x1, x0 = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = interpolate(x1, x0, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], x1[2])
    exact = velocity_loss(lambda x, tt, c, m: x1 - x0, x1, None, None, t, x0)
    assert torch.count_nonzero(exact) == 0
    zero = velocity_loss(lambda x, tt, c, m: torch.zeros_like(x), x1, None, None, t, x0)
    torch.testing.assert_close(zero, ((x1 - x0) ** 2).mean(dim=(1, 2, 3)))


def test_aux_loss_uses_4x_pooled_latents_and_weight():
    seen: list[tuple[int, ...]] = []

    def model(x, t, c, m):
        seen.append(tuple(x.shape))
        return torch.zeros_like(x)

    latents = torch.randn(2, 16, 16, 16)
    off = flow_matching_loss(
        model, latents, None, None, aux_weight=0.0, generator=torch.Generator().manual_seed(0)
    )
    assert seen == [(2, 16, 16, 16)] and off.aux.item() == 0 and torch.equal(off.loss, off.main)
    seen.clear()
    on = flow_matching_loss(
        model, latents, None, None, aux_weight=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert seen == [(2, 16, 16, 16), (2, 16, 4, 4)]
    assert on.aux.item() > 0
    torch.testing.assert_close(on.loss, on.main + 0.5 * on.aux)
    torch.testing.assert_close(on.main, off.main)  # same seed, same main-term draw
    with pytest.raises(ConfigError, match="divisible"):
        flow_matching_loss(model, torch.randn(1, 16, 12, 12), None, None, aux_weight=1.0)


def test_caption_dropout():
    caps = [f"caption {i}" for i in range(1000)]
    assert drop_captions(caps, 0.0, random.Random(0)) == caps
    assert set(drop_captions(caps, 1.0, random.Random(0))) == {""}
    dropped = drop_captions(caps, 0.1, random.Random(0)).count("")
    assert 60 < dropped < 140
    with pytest.raises(ConfigError):
        drop_captions(caps, 1.5, random.Random(0))


def test_tiny_transformer_learns_a_fixed_batch():
    """A few optimiser steps on one batch must lower the loss: loss, shapes and time convention
    fit together with the real diffusers transformer."""
    torch.manual_seed(0)
    tr = build_transformer(get_profile("tiny"), seed=0, zero_init=True).train()
    latents = torch.randn(4, 16, 16, 16)
    caps, mask = torch.randn(4, 8, 64), torch.ones(4, 8, dtype=torch.long)

    def model(x, t, c, m):
        return tr(x, t, c, m).sample

    def eval_loss() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return flow_matching_loss(model, latents, caps, mask, aux_weight=1.0, generator=g).loss.item()

    before = eval_loss()
    opt = torch.optim.AdamW(tr.parameters(), lr=2e-3)
    for step in range(40):
        out = flow_matching_loss(
            model, latents, caps, mask, aux_weight=1.0, generator=torch.Generator().manual_seed(step)
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)
