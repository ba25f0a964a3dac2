"""Lumina-Image 2.0 sampler: batched CFG with CFG-Renorm / CFG-Trunc, Euler / midpoint /
Flow-DPM-Solver, optional TeaCache, deterministic for a seed."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, Lumina2Pipeline, Lumina2Transformer2DModel
from diffusers.image_processor import VaeImageProcessor
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from common.errors import ConfigError
from model.flow import image_seq_len
from model.profiles import PROFILES, VAE_DOWNSAMPLE
from model.prompts import SystemPrompt, apply_system_prompt
from model.sampler.conditioning import PanelCondition
from model.sampler.denoiser import Lumina2Denoiser, TeaCache
from model.sampler.guidance import cfg_active, guide
from model.sampler.schedule import flow_sigmas
from model.sampler.solvers import SOLVERS, Solver, calls_per_step
from model.text import encode_prompts

log = logging.getLogger(__name__)

TEACACHE_FILE = "teacache.json"
# VAE downsampling x the profiles' patch size (2; a model with 1 x 1 patches takes these sizes too):
# one size granularity for every model, so a request valid for one profile is valid for all
PIXEL_MULTIPLE = VAE_DOWNSAMPLE * 2


class SamplerConfig(BaseModel):
    """Sampling settings. Defaults follow the paper: CFG-Renorm and CFG-Trunc on."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(4.0, ge=0.0, le=50.0)
    cfg_trunc: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="guidance only while model time t < cfg_trunc (0 = noise); 1 = never cut",
    )
    renorm: float = Field(1.0, ge=0.0, description="cap guided norm at renorm x conditional norm; 0 = off")
    solver: Solver = Solver.EULER
    shift: float | None = Field(None, gt=0.0, description="static time shift; None = the scheduler's")
    teacache: float = Field(0.0, ge=0.0, description="TeaCache threshold; 0 = off")
    system_prompt: SystemPrompt = SystemPrompt.B  # the official default (system_type real)


@dataclass
class GenerationResult:
    """Images (PIL / numpy / latents) and what it cost."""

    images: Any
    latents: torch.Tensor
    forward_calls: int  # transformer calls (a guided step batches cond + uncond into one call)
    model_rows: int  # batch rows through the transformer (what separate CFG calls would cost)
    teacache_skipped: int
    guided_steps: int


def check_size(height: int, width: int, transformer: Lumina2Transformer2DModel) -> None:
    """Raise a one-line :class:`ConfigError` for a size the model cannot generate (non-square sizes
    are fine: the RoPE tables bound rows by ``axes_lens[1]`` and columns by ``axes_lens[2]``)."""
    for name, value in (("height", height), ("width", width)):
        if value < PIXEL_MULTIPLE or value % PIXEL_MULTIPLE:
            raise ConfigError(f"{name} {value} must be a positive multiple of {PIXEL_MULTIPLE}")
    token = VAE_DOWNSAMPLE * transformer.config.patch_size  # pixels per image token along a side
    rows, cols = transformer.config.axes_lens[1:3]
    max_h, max_w = ((n - 1) * token // PIXEL_MULTIPLE * PIXEL_MULTIPLE for n in (rows, cols))
    if height > max_h or width > max_w:
        raise ConfigError(
            f"size {width}x{height} exceeds this model's RoPE range "
            f"(max height {max_h} px, max width {max_w} px)"
        )


class LuminaSampler:
    """Generates images from the components of a diffusers ``Lumina2Pipeline``."""

    def __init__(
        self,
        transformer: Lumina2Transformer2DModel,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        *,
        scheduler_config: dict[str, Any] | None = None,
        teacache_coefficients: Sequence[float] | None = None,
    ):
        self.transformer = transformer.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config or {})
        self.denoiser = Lumina2Denoiser(transformer)
        self.image_processor = VaeImageProcessor(vae_scale_factor=VAE_DOWNSAMPLE * 2)
        self.teacache_coefficients = tuple(teacache_coefficients or self._default_coefficients())

    @classmethod
    def from_pipeline(cls, pipe: Lumina2Pipeline, folder: str | Path | None = None) -> LuminaSampler:
        """Wrap a loaded pipeline; TeaCache coefficients come from ``folder/teacache.json`` if any."""
        coefficients = None
        if folder is not None and (Path(folder) / TEACACHE_FILE).is_file():
            coefficients = json.loads((Path(folder) / TEACACHE_FILE).read_text())["coefficients"]
        return cls(
            pipe.transformer,
            pipe.vae,
            pipe.text_encoder,
            pipe.tokenizer,
            scheduler_config=dict(pipe.scheduler.config),
            teacache_coefficients=coefficients,
        )

    @classmethod
    def load(cls, source: str | Path, **kwargs: Any) -> LuminaSampler:
        """Load from a diffusers folder or hub id (see :func:`model.checkpoint.load_pipeline`)."""
        from model.checkpoint import load_pipeline

        pipe = load_pipeline(source, **kwargs)
        folder = Path(source) if Path(str(source)).is_dir() else None
        return cls.from_pipeline(pipe, folder)

    def _default_coefficients(self) -> tuple[float, ...]:
        cfg = self.transformer.config
        for profile in PROFILES.values():
            spec = profile.transformer
            if (spec.hidden_size, spec.num_layers, spec.num_attention_heads) == (
                cfg.hidden_size,
                cfg.num_layers,
                cfg.num_attention_heads,
            ):
                return profile.teacache_coefficients
        return PROFILES["tiny"].teacache_coefficients

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def noise_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.transformer.config.in_channels, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)

    def initial_noise(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """The starting latents :meth:`generate` draws for ``batch`` prompts and ``seed`` (CPU)."""
        shape = self.noise_shape(batch, height, width)
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))

    def sigmas(self, config: SamplerConfig, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The noise-level schedule for these settings and latent size."""
        if config.shift is None and self.scheduler_config.get("use_dynamic_shifting", False):
            seq_len = image_seq_len(*latent_hw, self.transformer.config.patch_size)
            return flow_sigmas(config.steps, dynamic_seq_len=seq_len)
        shift = config.shift if config.shift is not None else float(self.scheduler_config.get("shift", 1.0))
        return flow_sigmas(config.steps, shift=shift)

    # -------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] = "",
        height: int = 1024,
        width: int = 1024,
        seed: int = 0,
        config: SamplerConfig | None = None,
        output_type: str = "pil",
        progress: bool = False,
        cache: TeaCache | None = None,
        noise: torch.Tensor | None = None,
        condition: PanelCondition | None = None,
    ) -> GenerationResult:
        """Generate one image per prompt (deterministic for ``seed``).

        ``cache`` overrides the TeaCache built from ``config.teacache`` (used by calibration).
        ``noise`` gives the initial latents (batch, C, height/8, width/8) instead of drawing them
        from ``seed`` (e.g. a server merging requests that each keep their own seed).
        ``condition`` makes it a dual-panel (Template C) grid of ``height`` x ``width``: the
        template's panel wording comes from it, its known panel is kept (replaced by its reference
        noised to the current time before the first and after every step) and ``images`` are its
        generated panel (or the grid); ``latents`` stay the whole grid's.
        """
        config = config or SamplerConfig()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ConfigError("at least one prompt is required")
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        if len(negatives) != len(prompts):
            raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        check_size(height, width, self.transformer)
        if condition is not None:
            condition.check(self.noise_shape(len(prompts), height, width))
        device, batch = self.device, len(prompts)
        lat_h, lat_w = height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE
        use_cfg = config.guidance_scale != 1.0

        fill = condition.fill_ins if condition is not None else {}
        texts = [apply_system_prompt(p, config.system_prompt, **fill) for p in prompts]
        if use_cfg:  # a non-empty negative gets the template too, as in the official sample.py
            texts += [apply_system_prompt(n, config.system_prompt, **fill) if n else "" for n in negatives]
        emb = encode_prompts(texts, self.tokenizer, self.text_encoder, device=device)
        full_ctx = self.denoiser.prepare(emb.embeds, emb.mask, lat_h, lat_w)
        cond_ctx = self.denoiser.subset(full_ctx, batch) if use_cfg else full_ctx

        shape = self.noise_shape(batch, height, width)
        if noise is None:
            latents = self.initial_noise(batch, height, width, seed)
        elif tuple(noise.shape) != shape:
            raise ConfigError(f"noise shape {tuple(noise.shape)} does not match {shape}")
        else:
            latents = noise
        latents = latents.to(device, torch.float32)

        sigmas = self.sigmas(config, (lat_h, lat_w))
        hook = condition.step_hook(latents) if condition is not None else None
        if hook is not None:  # the known panel at the start time too
            latents = hook(latents, 1.0 - float(sigmas[0]))
        n_calls = config.steps * calls_per_step(config.solver)
        if cache is None and config.teacache > 0:
            cache = TeaCache(config.teacache, self.teacache_coefficients, num_steps=n_calls)
        calls_before, rows_before = self.denoiser.forward_calls, self.denoiser.forward_rows
        guided = 0

        def velocity(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
            nonlocal guided
            t_step = 1.0 - float(sigmas[step])  # truncation decided per step, by its start time
            if use_cfg and cfg_active(t_step, config.guidance_scale, config.cfg_trunc):
                out = self.denoiser(torch.cat([x, x]), t, full_ctx, cache, branches=2)
                guided += 1
                return guide(out[:batch], out[batch:], config.guidance_scale, config.renorm)
            return self.denoiser(x, t, cond_ctx, cache)

        bar = tqdm(total=config.steps, desc="sampling", disable=not progress, leave=False)
        latents = SOLVERS[config.solver](velocity, latents, sigmas, bar.update, step_hook=hook)
        bar.close()

        images = self.decode(latents if condition is None else condition.crop(latents), output_type)
        return GenerationResult(
            images=images,
            latents=latents,
            forward_calls=self.denoiser.forward_calls - calls_before,
            model_rows=self.denoiser.forward_rows - rows_before,
            teacache_skipped=cache.skipped if cache else 0,
            guided_steps=guided // calls_per_step(config.solver),
        )

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> Any:
        """Latents → images (``pil``, ``np``, ``pt``) or the latents themselves (``latent``)."""
        if output_type == "latent":
            return latents
        vae_dtype = next(self.vae.parameters()).dtype
        scaled = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(scaled.to(vae_dtype), return_dict=False)[0]
        return self.image_processor.postprocess(image.float(), output_type=output_type)
