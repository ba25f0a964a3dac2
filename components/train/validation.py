"""Validation loss on the held-out split (issue #12): the flow-matching loss of a transformer on
images it was never trained on, at fixed times and fixed noise (:func:`model.flow.validation_loss`),
so stages, runs and the evaluate step give comparable numbers.

The held-out manifest is the tier step's ``heldout.parquet`` (same schema as the tier manifests;
images disjoint from every tier by id). Its first ``limit`` rows (sorted by id) are read, encoded
with the given VAE at the resolution's aspect-ratio buckets exactly as training encodes them, and
captioned as training captions them (the domain's system prompt) but deterministically: the first
English caption of one granularity (``short`` by default), else the first English caption, else
the first training caption.

:func:`stage_val_loss` is the hook at the end of a training stage (the EMA export, logged as
``val_loss``); the evaluate step calls :func:`heldout_val_loss` with the same settings.
:func:`stage_compositional` is the second hook: the compositional scores on held-out synthetic
prompts at the stage's resolution (``val_colors`` ...), so each stage's gain is on record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from common.errors import ConfigError
from components.train.data import (
    TrainRecord,
    bucket_sizes,
    image_size,
    iter_manifest,
    load_image,
    nearest_bucket,
    prompt_texts,
    training_captions,
)
from model.flow import validation_loss
from model.prompts import SystemPrompt
from model.text import encode_prompts
from model.vae import encode_pixels

log = logging.getLogger(__name__)
HELDOUT_FILE = "heldout.parquet"
VAL_IMAGES = 32
VAL_GRANULARITY = "short"


def heldout_manifest(path: str | Path) -> Path:
    """A held-out manifest given as the file or as the tier folder holding ``heldout.parquet``."""
    path = Path(path)
    path = path / HELDOUT_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"held-out manifest not found: {path}")
    return path


def heldout_records(
    path: str | Path, image_root: str | Path | None = None, limit: int = VAL_IMAGES
) -> list[TrainRecord]:
    """The first ``limit`` records of the held-out manifest (read in one batch of ``limit`` rows)."""
    records: list[TrainRecord] = []
    for chunk in iter_manifest(heldout_manifest(path), image_root, batch_rows=limit):
        records += chunk[: limit - len(records)]
        if len(records) >= limit:
            break
    return records


def validation_caption(
    record: TrainRecord,
    system_prompts: dict[str, SystemPrompt] | None = None,
    granularity: str = VAL_GRANULARITY,
    language: str = "en",
) -> str:
    """The record's caption for the validation loss (deterministic; system prompt per domain)."""
    captions = training_captions(record)
    if not captions:
        return ""
    in_language = [c for c in captions if c.language == language]
    exact = [c for c in in_language if c.granularity == granularity]
    chosen = (exact or in_language or captions)[0]
    return prompt_texts(record, [chosen], system_prompts)[0]


def encode_heldout(
    records: list[TrainRecord], vae: torch.nn.Module, resolution: int, captions: list[str]
) -> list[tuple[torch.Tensor, list[str]]]:
    """``(latents, captions)`` per aspect-ratio bucket, in first-seen order (an image that cannot be
    read is logged and left out)."""
    buckets = bucket_sizes(resolution)
    groups: dict[tuple[int, int], tuple[list[torch.Tensor], list[str]]] = {}
    for record, caption in zip(records, captions, strict=True):
        try:
            size = nearest_bucket(*image_size(record), buckets)
            pixels = load_image(record, size)
        except (OSError, ValueError) as exc:
            log.warning("val_loss: held-out image %s left out: %s", record.id, str(exc).splitlines()[0])
            continue
        group = groups.setdefault(size, ([], []))
        group[0].append(pixels)
        group[1].append(caption)
    return [(encode_pixels(vae, torch.stack(pixels)), texts) for pixels, texts in groups.values()]


@torch.no_grad()
def heldout_val_loss(
    manifest: str | Path,
    *,
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    tokenizer,
    text_encoder: torch.nn.Module,
    resolution: int,
    image_root: str | Path | None = None,
    limit: int = VAL_IMAGES,
    seed: int = 0,
    granularity: str = VAL_GRANULARITY,
    system_prompts: dict[str, SystemPrompt] | None = None,
) -> tuple[float, int]:
    """(validation loss, images used): the mean over the held-out images (each bucket's batch
    weighted by its size) of :func:`model.flow.validation_loss` with ``seed``. Runs where the
    transformer is; NaN with 0 images when none could be read."""
    records = heldout_records(manifest, image_root, limit)
    captions = [validation_caption(r, system_prompts, granularity) for r in records]
    device = next(transformer.parameters()).device
    total, count = 0.0, 0
    for latents, texts in encode_heldout(records, vae, resolution, captions):
        emb = encode_prompts(texts, tokenizer, text_encoder)
        feats, mask = emb.embeds.to(device, torch.float32), emb.mask.to(device)

        def velocity(x, t, c, m):
            return transformer(x, t, c, m).sample.float()

        loss = validation_loss(velocity, latents.to(device), feats, mask, seed=seed)
        total, count = total + loss * len(texts), count + len(texts)
    return (total / count if count else float("nan")), count


@contextlib.contextmanager
def on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """The modules on ``device`` for the block, then back where each was."""
    before = [next(m.parameters()).device for m in modules]
    try:
        for module in modules:
            module.to(device)
        yield
    finally:
        for module, where in zip(modules, before, strict=True):
            module.to(where)


def stage_val_loss(cfg, pipe, tracker=None, device: torch.device | str | None = None) -> float | None:
    """The end-of-stage hook: ``val_loss`` of ``pipe`` (the stage's export: EMA transformer, the
    stage's VAE and text encoder) on ``cfg.heldout`` at the stage resolution, logged to the stage's
    MLflow run at the last step. None without a held-out manifest."""
    if cfg.heldout is None:
        return None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with on_device([pipe.transformer, pipe.vae, pipe.text_encoder], device):
        loss, count = heldout_val_loss(
            cfg.heldout, transformer=pipe.transformer, vae=pipe.vae, tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder, resolution=cfg.resolution, image_root=cfg.image_root,
            limit=cfg.val_images, seed=cfg.val_seed, granularity=cfg.val_granularity,
            system_prompts=cfg.system_prompts,
        )  # fmt: skip
    log.info("stage %s: val_loss %.4f on %d held-out images", cfg.stage, loss, count)
    if tracker is not None:
        tracker.log_metrics({"val_loss": loss, "val_images": float(count)}, step=cfg.steps)
    return loss


def stage_compositional(
    cfg, pipe, tracker=None, device: torch.device | str | None = None
) -> dict[str, float]:
    """The end-of-stage compositional scores: ``val_presence`` / ``val_counting`` / ``val_colors`` /
    ``val_position`` of ``pipe`` (the stage's export) on ``cfg.val_prompts`` held-out synthetic
    prompts (:func:`components.evaluate.suites.synthetic_suite`) at ``cfg.val_resolution`` (default:
    the stage resolution), sampled and scored as the evaluate step does (its default sampler, the
    synthetic domain's system prompt),
    logged to the stage's MLflow run at the last step. Like ``val_loss``, it runs when the stage has
    a held-out split (``cfg.heldout``: validation is on); empty without one or with ``val_prompts: 0``."""
    if cfg.heldout is None or cfg.val_prompts <= 0:
        return {}
    import tempfile

    from components.evaluate.compositional import CATEGORIES
    from components.evaluate.evaluate import EvalConfig, generate_suite, suite_scores
    from components.evaluate.suites import synthetic_suite
    from model.prompts import domain_template
    from model.sampler import LuminaSampler

    size = cfg.val_resolution or cfg.resolution
    ev = EvalConfig(height=size, width=size,
                    synthetic_system_prompt=domain_template("synthetic", cfg.system_prompts))  # fmt: skip
    items = synthetic_suite(cfg.val_prompts, size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules = [pipe.transformer, pipe.vae, pipe.text_encoder]
    with on_device(modules, device), tempfile.TemporaryDirectory() as tmp:
        records = generate_suite(LuminaSampler.from_pipeline(pipe), items, Path(tmp), ev, progress=False)
    scores = {f"val_{c}": v for c, v in suite_scores(records).items() if c in CATEGORIES}
    log.info("stage %s: %s on %d held-out synthetic prompts", cfg.stage,
             ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), len(records))  # fmt: skip
    if tracker is not None:
        tracker.log_metrics(scores, step=cfg.steps)
    return scores
