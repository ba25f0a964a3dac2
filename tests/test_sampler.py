import numpy as np
import pytest
import torch

from common.errors import ConfigError
from model.prompts import SystemPrompt, apply_system_prompt
from model.sampler import LuminaSampler, SamplerConfig, Solver
from model.sampler.denoiser import TeaCache
from model.sampler.guidance import cfg_active, renorm_guided
from model.sampler.schedule import flow_sigmas
from model.sampler.solvers import SOLVERS
from model.text import encode_prompts
from tests.oracle import OracleDenoiser

PROMPTS = ["a red cat on the left of a blue car", "three yellow apples"]


@pytest.mark.parametrize("solver", list(Solver))
def test_solvers_reach_target_with_exact_velocity(solver):
    target, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigmas = flow_sigmas(12, shift=6.0)
    out = SOLVERS[solver](lambda x, t, i: (target - x) / (1.0 - t), noise, sigmas, lambda: None)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("solver", list(Solver))
def test_sampler_loop_reaches_target_with_exact_velocity(tiny_pipe, solver):
    target = torch.randn(2, 16, 8, 8)
    sampler = LuminaSampler.from_pipeline(tiny_pipe)
    sampler.denoiser = OracleDenoiser(tiny_pipe.transformer, target)
    res = sampler.generate(
        PROMPTS, height=64, width=64, config=SamplerConfig(steps=8, solver=solver), output_type="latent"
    )
    torch.testing.assert_close(res.images, target, atol=1e-4, rtol=1e-4)


def test_a_non_trivial_velocity_is_not_reached_by_chance(tiny_pipe):
    """Control for the oracle tests: a wrong velocity field does not land on the target."""
    target = torch.randn(2, 16, 8, 8)
    sampler = LuminaSampler.from_pipeline(tiny_pipe)
    sampler.denoiser = OracleDenoiser(tiny_pipe.transformer, target)
    sampler.denoiser.target = target * 0.5
    res = sampler.generate(PROMPTS, height=64, width=64, config=SamplerConfig(steps=8), output_type="latent")
    assert (res.images - target).abs().max() > 0.1


def test_cfg_trunc_cuts_unconditional_rows_as_scheduled(tiny_sampler):
    steps, batch = 10, len(PROMPTS)
    sigmas = flow_sigmas(steps, shift=6.0)
    for trunc in (1.0, 0.25, 0.0):
        expected_guided = sum(1 for i in range(steps) if 1 - float(sigmas[i]) < trunc)
        res = tiny_sampler.generate(
            PROMPTS,
            height=32,
            width=32,
            config=SamplerConfig(steps=steps, cfg_trunc=trunc),
            output_type="latent",
        )
        assert res.guided_steps == expected_guided
        assert res.forward_calls == steps  # one batched call per step, guided or not
        assert res.model_rows == 2 * batch * expected_guided + batch * (steps - expected_guided)
    assert 0 < sum(1 for i in range(steps) if 1 - float(sigmas[i]) < 0.25) < steps
    assert not cfg_active(0.1, 1.0, 1.0)  # scale 1 never needs the unconditional branch


def test_midpoint_uses_two_calls_per_step(tiny_sampler):
    res = tiny_sampler.generate(
        "a cat", height=32, width=32, config=SamplerConfig(steps=5, solver="midpoint"), output_type="latent"
    )
    assert res.forward_calls == 10


def test_renorm_caps_norm_at_multiple_of_conditional_norm():
    cond = torch.randn(3, 16, 4, 4)
    guided = torch.stack([cond[0] * 5.0, cond[1] * 0.5, -cond[2] * 3.0])
    out = renorm_guided(guided, cond, 1.0)
    norms = torch.linalg.vector_norm(out.flatten(1), dim=1)
    cond_norms = torch.linalg.vector_norm(cond.flatten(1), dim=1)
    torch.testing.assert_close(norms[[0, 2]], cond_norms[[0, 2]])  # capped to 1x
    torch.testing.assert_close(out[1], guided[1])  # under the cap: untouched (official semantics)
    torch.testing.assert_close(
        torch.linalg.vector_norm(renorm_guided(guided, cond, 2.0)[0]), 2.0 * cond_norms[0]
    )
    assert torch.equal(renorm_guided(guided, cond, 0.0), guided)


def test_renorm_limits_guided_samples_in_the_sampler(tiny_sampler):
    cfg = dict(steps=6, guidance_scale=30.0, cfg_trunc=1.0)
    raw = tiny_sampler.generate(
        "a cat", height=32, width=32, config=SamplerConfig(renorm=0.0, **cfg), output_type="latent"
    )
    capped = tiny_sampler.generate(
        "a cat", height=32, width=32, config=SamplerConfig(renorm=1.0, **cfg), output_type="latent"
    )
    assert capped.images.norm() < raw.images.norm()


def test_teacache_skips_steps_within_stated_error(tiny_sampler):
    cfg = dict(steps=20, cfg_trunc=0.25)
    ref = tiny_sampler.generate(
        PROMPTS, height=64, width=64, config=SamplerConfig(**cfg), output_type="latent"
    )
    never = tiny_sampler.generate(
        PROMPTS, height=64, width=64, config=SamplerConfig(teacache=1e-12, **cfg), output_type="latent"
    )
    assert never.teacache_skipped == 0
    torch.testing.assert_close(never.images, ref.images, atol=1e-5, rtol=1e-5)
    cached = tiny_sampler.generate(
        PROMPTS, height=64, width=64, config=SamplerConfig(teacache=0.05, **cfg), output_type="latent"
    )
    assert cached.teacache_skipped >= 5
    rel = ((cached.images - ref.images).norm() / ref.images.norm()).item()
    assert rel < 0.05  # stated bound: under 5% relative L2 error in latent space at 20 steps


def test_teacache_polynomial_is_used_as_fitted():
    """The reference applies np.poly1d(coefficients) as is: a negative prediction lowers the sum."""
    cache = TeaCache(0.5, (1.0, -0.5), num_steps=10)
    assert cache.rescale(0.1) == pytest.approx(-0.4)


def test_teacache_branches_keep_their_own_accumulators():
    cache = TeaCache(0.3, (1.0, 0.0), num_steps=10)
    cond, uncond = torch.ones(2, 4, 8), torch.ones(2, 4, 8)
    for name, tensor in (("cond", cond), ("uncond", uncond)):
        assert cache.should_compute(name, tensor)  # step 0 always runs
        cache.branches[name].residual = torch.zeros_like(tensor)
    cache.next_step()
    decisions = []
    for _ in range(4):
        cond = cond * 1.5  # the conditional input changes by 50% per step, the other by 1%
        uncond = uncond * 1.01
        decisions.append((cache.should_compute("cond", cond), cache.should_compute("uncond", uncond)))
        cache.next_step()
    assert decisions == [(True, False)] * 4  # one joint accumulator would run (or skip) both
    assert cache.branches["uncond"].skipped == 4 and cache.branches["cond"].skipped == 0 == 4 - cache.skipped


def test_teacache_one_branch_from_cache_the_other_computed_alone(tiny_sampler, monkeypatch):
    """A step where only the conditional rows run (alone, on their own shorter joint sequence) and
    the unconditional rows reuse an exact residual gives the full batched call's velocity."""
    sampler = tiny_sampler
    texts = [apply_system_prompt(p) for p in PROMPTS] + ["", "blurry"]  # captions of unequal length
    emb = encode_prompts(texts, sampler.tokenizer, sampler.text_encoder)
    ctx = sampler.denoiser.prepare(emb.embeds, emb.mask, 8, 8)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = torch.cat([x, x])
    reference = sampler.denoiser(batch, 0.4, ctx)
    cache = TeaCache(1.0, (1.0, 0.0), num_steps=10)
    first = sampler.denoiser(batch, 0.4, ctx, cache, branches=2)  # step 0: every row runs
    torch.testing.assert_close(first, reference)
    monkeypatch.setattr(TeaCache, "should_compute", lambda self, name, _: name == "cond")
    mixed = sampler.denoiser(batch, 0.4, ctx, cache, branches=2)
    torch.testing.assert_close(mixed, reference, atol=1e-5, rtol=1e-4)


def test_seeded_determinism_batch_and_non_square(tiny_sampler):
    cfg = SamplerConfig(steps=4)
    a = tiny_sampler.generate(PROMPTS, height=48, width=80, seed=7, config=cfg, output_type="np").images
    b = tiny_sampler.generate(PROMPTS, height=48, width=80, seed=7, config=cfg, output_type="np").images
    c = tiny_sampler.generate(PROMPTS, height=48, width=80, seed=8, config=cfg, output_type="np").images
    assert a.shape == (2, 48, 80, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    pil = tiny_sampler.generate("a cat", height=32, width=48, config=cfg).images
    assert pil[0].size == (48, 32)


@pytest.mark.parametrize("size", [(50, 64), (64, 0), (64, 8), (4096, 64)])
def test_bad_sizes_are_clear_errors(tiny_sampler, size):
    with pytest.raises(ConfigError, match=r"multiple of 16|RoPE range"):
        tiny_sampler.generate("a cat", height=size[0], width=size[1], config=SamplerConfig(steps=1))


def test_bad_sampler_settings_are_rejected():
    with pytest.raises(ValueError):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError):
        SamplerConfig(solver="rk45")
    with pytest.raises(ValueError):
        SamplerConfig(cfg_trunc=1.5)


def test_matches_diffusers_pipeline_without_renorm(tiny_pipe, tiny_sampler):
    """Plain Euler + full CFG equals diffusers' Lumina2Pipeline on the same weights."""
    system = (
        "You are an assistant designed to generate superior images with the superior degree of "
        "image-text alignment based on textual prompts or user prompts."
    )
    ours = tiny_sampler.generate(
        PROMPTS,
        height=64,
        width=64,
        seed=0,
        output_type="np",
        config=SamplerConfig(steps=8, cfg_trunc=1.0, renorm=0.0, system_prompt="B"),
    ).images
    tiny_pipe.set_progress_bar_config(disable=True)
    peer = tiny_pipe(
        PROMPTS,
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=4.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        cfg_normalization=False,
        cfg_trunc_ratio=1.0,
        system_prompt=system,
    ).images
    assert np.abs(ours - peer).max() < 1e-4
    assert ours.std() > 0.01  # the comparison is not between two blank images


def test_a_non_empty_negative_prompt_gets_the_system_template(tiny_sampler, monkeypatch):
    """As in the official sample.py: ``neg_cap = system_prompt + neg_cap`` unless it is empty."""
    import model.sampler.sampler as sampler_module

    seen: list[list[str]] = []
    real_encode = sampler_module.encode_prompts

    def recording(texts, *args, **kwargs):
        seen.append(list(texts))
        return real_encode(texts, *args, **kwargs)

    monkeypatch.setattr(sampler_module, "encode_prompts", recording)
    cfg = SamplerConfig(steps=1)
    tiny_sampler.generate(["a cat", "a dog"], height=64, width=64, config=cfg, output_type="latent",
                          negative_prompt=["blurry", ""])  # fmt: skip
    template = apply_system_prompt("blurry", SystemPrompt.B)
    assert seen[-1] == [apply_system_prompt("a cat"), apply_system_prompt("a dog"), template, ""]


def test_explicit_noise_matches_the_seed_and_is_checked(tiny_sampler):
    cfg = SamplerConfig(steps=2)
    seeded = tiny_sampler.generate(
        ["a red circle"], height=64, width=64, seed=3, config=cfg, output_type="latent"
    )
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    given = tiny_sampler.generate(
        ["a red circle"], height=64, width=64, config=cfg, output_type="latent", noise=noise
    )
    assert torch.equal(seeded.latents, given.latents)
    with pytest.raises(ConfigError, match="noise shape"):
        tiny_sampler.generate(["a"], height=64, width=64, config=cfg, noise=torch.zeros(2, 16, 8, 8))


def test_rope_range_follows_the_patch_size():
    """The largest size is the RoPE table's tokens x the pixels per token (VAE factor x patch),
    rounded down to the size granularity (16): a 1 x 1-patch model reaches half as far."""
    from types import SimpleNamespace

    from model.sampler.sampler import check_size

    def model(patch: int) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(patch_size=patch, axes_lens=(300, 128, 128)))

    check_size(2032, 64, model(2))
    check_size(1008, 64, model(1))  # 127 tokens x 8 px = 1016 -> 1008
    with pytest.raises(ConfigError, match=r"max height 1008 px, max width 1008 px"):
        check_size(1024, 64, model(1))
    with pytest.raises(ConfigError, match=r"max height 2032 px"):
        check_size(2048, 64, model(2))
