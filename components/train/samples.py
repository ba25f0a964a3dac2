"""Sample grids: one row of images for a stage's fixed prompts and seed, at the end of the stage
and (``sample_every``) from an EMA snapshot during it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image

from components.tracking import MlflowTracker
from components.train.config import TrainConfig
from components.train.ema import Ema


def sample_grid(cfg: TrainConfig, pipe, path: Path, transformer: torch.nn.Module | None = None) -> Path:
    """One row of images for the fixed sample prompts and seed (``transformer`` overrides the
    pipeline's, e.g. an EMA snapshot)."""
    from model.sampler import LuminaSampler, SamplerConfig

    sampler = LuminaSampler(
        transformer or pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
    )  # fmt: skip
    images = sampler.generate(
        cfg.sample_prompts, height=cfg.resolution, width=cfg.resolution, seed=cfg.seed,
        config=SamplerConfig(steps=20),
    ).images  # fmt: skip
    grid = Image.new("RGB", (cfg.resolution * len(images), cfg.resolution))
    for i, image in enumerate(images):
        grid.paste(image, (i * cfg.resolution, 0))
    grid.save(path)
    return path


def log_ema_samples(
    cfg: TrainConfig, tracker: MlflowTracker, pipe, ema: Ema, transformer: torch.nn.Module, done: int
) -> None:
    """A grid from the EMA weights after step ``done`` (``output_dir/samples-{done}.png``), logged
    to the run's ``samples`` artifacts; the trained ``transformer`` is left in training mode."""
    snapshot = ema.model(transformer)
    grid_pipe = copy.copy(pipe)
    grid_pipe.register_modules(transformer=snapshot)
    tracker.log_artifact(sample_grid(cfg, grid_pipe, cfg.output_dir / f"samples-{done:06d}.png"), "samples")
    transformer.train()
