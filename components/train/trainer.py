"""One training stage on the DeepSpeed engine: cached features in, checkpoints and a diffusers
pipeline folder (EMA weights) out, metrics to MLflow (or a JSONL file when tracking is off).

:func:`train_stage` is the loop; :func:`start_stage` sets everything up before it. The helpers it
uses: :mod:`~components.train.ema` (the EMA weights), :mod:`~components.train.resume` (saving and
resuming checkpoints, the loss record), :mod:`~components.train.tracking` (the MLflow run, step
metrics, artifacts) and :mod:`~components.train.samples` (sample grids)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import Lumina2Transformer2DModel

from common.errors import ConfigError
from components.latents.cache import index_files
from components.tracking import MlflowTracker
from components.train import checkpoints
from components.train.config import TrainConfig
from components.train.data import choose_caption, fingerprint, pad_features
from components.train.ema import Ema, whole_parameters
from components.train.launch import free_port
from components.train.loader import StageFilter, StageStream
from components.train.resume import append_losses, checkpoint_due, read_losses, resume, save_checkpoint
from components.train.samples import log_ema_samples
from components.train.sources import encode_manifest, text_feature_cache, usable_index
from components.train.tracking import Throughput, finish_tracking, log_step, start_tracking, write_artifacts
from components.train.validation import stage_compositional, stage_val_loss
from model.checkpoint import RAW_TRANSFORMER_DIR, build_pipeline, load_for_training, save_pipeline
from model.flow import TimestepSampler, flow_matching_loss
from model.text import encode_prompts

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"
EXPORT_DIR = "pipeline"


@dataclass
class StageResult:
    """Where a finished stage left its outputs, and its last metrics."""

    pipeline_dir: Path
    steps: int
    final_loss: float
    losses: list[float]
    run_id: str = ""  # the MLflow run (rank 0, when tracked)
    val_loss: float | None = None  # the EMA export's loss on cfg.heldout (rank 0; None without it)


def ensure_distributed_env() -> bool:
    """Single-process defaults so DeepSpeed starts without a launcher (gloo on CPU). Returns whether
    the rendezvous port is ours to choose (no launcher set ``MASTER_PORT``)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    owned = "MASTER_PORT" not in os.environ
    if owned:
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    return owned


def skip_shared_memory_inference_op() -> None:
    """On the CPU, keep DeepSpeed from compiling its shared-memory collectives op
    (``deepspeed_shm_comm``: ~25 s on 2 cores, the first time on a machine) when its backend starts.
    Only ``inference_all_reduce`` (tensor-parallel inference) uses that op; training's collectives
    go through torch.distributed (gloo on the CPU) either way."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps this dict


def init_distributed(owned_port: bool, attempts: int = 5, timeout_minutes: float = 30.0) -> None:
    """``deepspeed.init_distributed()``; when the port is ours, it is picked right before each bind
    attempt (and again if another process took it in between: EADDRINUSE), instead of failing."""
    import deepspeed

    skip_shared_memory_inference_op()
    for attempt in range(attempts):
        if owned_port:
            os.environ["MASTER_PORT"] = str(free_port())
        try:
            deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
            return
        except Exception as exc:  # torch's DistNetworkError; anything else is re-raised
            if not owned_port or "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                raise
            log.warning("rendezvous port %s was taken; trying another", os.environ["MASTER_PORT"])


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.gradient_accumulation(world_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The LR of optimiser step ``step`` (0-based) as a fraction of ``cfg.lr``: a linear warmup
    over ``warmup_steps`` (the first step at lr / warmup), then constant, a cosine down to
    ``min_lr_ratio`` at the last step, or (``wsd``) constant until the last ``decay_fraction`` of
    the steps and a straight line down to ``min_lr_ratio`` at the last step over them."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "wsd":
        decay = max(round(cfg.decay_fraction * cfg.steps), 1)
        start = max(cfg.steps - decay, warmup)
        if step < start:
            return 1.0
        progress = (step - start + 1) / max(cfg.steps - start, 1)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * min(progress, 1.0)
    span = max(cfg.steps - 1 - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch(
    cfg: TrainConfig, stream: StageStream, step: int, micro: int, rank: int
) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """The next micro batch of the rank's stream, with its captions, caption dropout and noise
    generator drawn from (seed, step, micro, rank): a resumed run sees exactly the data, captions,
    noise and times an uninterrupted run would."""
    batch = stream.next()
    rng = random.Random(f"{cfg.seed}:{step}:{micro}:{rank}")
    texts = [
        ""
        if rng.random() < cfg.caption_dropout
        else choose_caption(r, rng, cfg.granularity_weights, cfg.language_weights, cfg.system_prompts)
        for r in batch.records
    ]
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    return batch.latents, texts, gen


@torch.no_grad()
def caption_features(
    cfg: TrainConfig, text: dict[str, torch.Tensor] | None, pipe, texts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded Gemma features and mask of a micro batch's captions: from the stage's feature
    cache, or (``text_features: online``) encoded now by the frozen text encoder."""
    if cfg.text_features == "cache" and text is not None:
        return pad_features([text[t] for t in texts])
    if next(pipe.text_encoder.parameters()).device != torch.device(device):
        pipe.text_encoder.to(device)
    emb = encode_prompts(texts, pipe.tokenizer, pipe.text_encoder, device=device)
    return emb.embeds.float(), emb.mask.long()


def stage_index(cfg: TrainConfig, pipe, flt: StageFilter) -> list[str]:
    """The latent index files the stage streams from (every rank gets rank 0's answer): the
    pipeline's index when it fits the stage, else the manifest encoded into the cache folder."""
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        files = usable_index(cfg.latents, flt) if cfg.latents is not None else None
        if files is None:
            if not cfg.manifest.is_file():
                raise ConfigError(f"training manifest not found: {cfg.manifest} (and no usable latent index)")
            local = encode_manifest(cfg.manifest, cfg.image_root, pipe.vae, flt, cfg.resolved_cache_dir)
            files = index_files(local)
        else:
            log.info("latents %dpx: streaming from %s", cfg.resolution, cfg.latents)
        box = [files]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stage_text_features(
    cfg: TrainConfig, pipe, files: list[str], flt: StageFilter
) -> dict[str, torch.Tensor] | None:
    """``text_features: cache``: every caption variant's features (rank 0 computes, then all load)."""
    import torch.distributed as dist

    if cfg.text_features != "cache":
        return None
    cache_file = cfg.resolved_cache_dir / f"text-{fingerprint(pipe.text_encoder)}.pt"

    def build() -> dict[str, torch.Tensor]:
        return text_feature_cache(files, flt, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  system_prompts=cfg.system_prompts, cache_file=cache_file)  # fmt: skip

    text = build() if dist.get_rank() == 0 else None
    dist.barrier()
    return text if text is not None else build()


@dataclass
class StageRun:
    """What the training loop works with (set up by :func:`start_stage`)."""

    pipe: object  # the diffusers pipeline
    transformer: torch.nn.Module  # the pipeline's transformer, the one trained
    text: dict[str, torch.Tensor] | None  # the caption feature cache (``text_features: cache``)
    engine: object  # the DeepSpeed engine around the transformer
    optimizer: torch.optim.Optimizer
    ema: Ema
    stream: StageStream
    tracker: MlflowTracker | None
    world: int
    rank: int
    start: int  # the step resumed from (0: from the start)
    bf16: bool


def train_stage(cfg: TrainConfig, tracker: MlflowTracker | None = None) -> StageResult:
    """Run one stage; resumes from ``output_dir/checkpoints`` when a checkpoint is there.

    With ``cfg.track`` (default) rank 0 opens an MLflow run (tracking URI from
    ``MLFLOW_TRACKING_URI``, else sqlite beside the outputs) unless a tracker is passed in.
    """
    run = start_stage(cfg, tracker)
    engine, ema, stream, tracker, rank = run.engine, run.ema, run.stream, run.tracker, run.rank
    transformer = run.transformer
    sampler = TimestepSampler(cfg.timestep_sampling, static_shift=cfg.time_shift)
    accum = cfg.gradient_accumulation(run.world)
    velocity = velocity_model(engine, torch.bfloat16 if run.bf16 else torch.float32)

    ckpt_dir, start, losses = cfg.output_dir / CKPT_DIR, run.start, []  # losses since the last checkpoint
    patch = transformer.config.patch_size
    meter = Throughput(patch)
    schedule = checkpoints.CheckpointSchedule(cfg.checkpoint_every, cfg.steps, cfg.checkpoint_minutes)
    for step in range(run.start, cfg.steps):
        step_loss = step_aux = 0.0
        lr = run.optimizer.param_groups[0]["lr"]  # this step's (the scheduler steps with the optimiser)
        for micro in range(accum):
            latents, texts, gen = micro_batch(cfg, stream, step, micro, rank)
            dev = engine.device
            feats, mask = caption_features(cfg, run.text, run.pipe, texts, dev)
            out = flow_matching_loss(
                velocity, latents.to(dev), feats.to(dev), mask.to(dev),
                sampler=sampler, aux_weight=cfg.aux_weight, patch_size=patch, generator=gen,
            )  # fmt: skip
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.item() / accum
            step_aux += out.aux.item() / accum
            meter.count(latents, mask)
        ema.update(transformer)
        losses.append(step_loss)
        done = step + 1
        if tracker is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            log_step(tracker, engine, lr, meter, done, step_loss, step_aux)
        if tracker is not None and cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            log_ema_samples(cfg, tracker, run.pipe, ema, transformer, done)
        if checkpoint_due(schedule, done, engine.device):
            if rank == 0:
                append_losses(cfg.output_dir, start, losses)  # before the marker: resume rewrites later rows
                start, losses = done, []
            save_checkpoint(engine, ema, ckpt_dir, done, cfg.keep_checkpoints, stream.position)
            schedule.saved()
    stream.close()
    return finish_stage(cfg, run)


def velocity_model(engine: Any, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The engine as a velocity function ``v(x_t, t, caption features, mask)`` in fp32. Latents and
    caption features go in at ``dtype``; the timestep stays fp32 up to the timestep embedder's
    sinusoids (the model casts their output), as in the official trainer: in bf16, t would be
    quantised to steps of ~0.004."""

    def velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return engine(x.to(dtype), t.float(), c.to(dtype), m).sample.float()

    return velocity


def start_stage(cfg: TrainConfig, tracker: MlflowTracker | None) -> StageRun:
    """Everything before the first step, in an order that fixes the random state: the seed, the
    pipeline, the process group, the stage's latents and caption features, the engine, the EMA
    weights and the resumed checkpoint, the MLflow run and the data stream (at the resumed position)."""
    owned_port = ensure_distributed_env()
    import deepspeed  # noqa: F401  imported late: it initialises its accelerator on import

    torch.manual_seed(cfg.seed)
    if not cfg.manifest.is_file() and cfg.latents is None:  # with an index, only its fallback needs one
        raise ConfigError(f"training manifest not found: {cfg.manifest}")
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    # a previous stage's export starts from its raw weights (official --init_from), not its EMA
    pipe = (
        load_for_training(cfg.init_from)
        if cfg.init_from
        else build_pipeline(cfg.profile, seed=cfg.seed, vae=cfg.vae)
    )
    init_distributed(owned_port, timeout_minutes=cfg.collective_timeout_minutes)

    flt = StageFilter(cfg.resolution, fingerprint(pipe.vae), str(cfg.stage))
    index = stage_index(cfg, pipe, flt)
    text = stage_text_features(cfg, pipe, index, flt)

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine, optimizer = build_engine(cfg, pipe.transformer, world, bf16)
    rank = engine.global_rank
    ema = Ema(pipe.transformer, cfg.ema_decay, cfg.zero_stage)
    start, position = resume(engine, ema, cfg.output_dir / CKPT_DIR)
    if start:
        log.info("resumed stage %s at step %d (data at %s)", cfg.stage, start, position)
    tracker = start_tracking(cfg, tracker, rank, start, world)
    stream = StageStream(
        index, flt, micro_batch=cfg.micro_batch, seed=cfg.seed, rank=rank, world=world,
        unit_size=cfg.loader_unit, workers=cfg.loader_workers, start=position,
    )  # fmt: skip
    log.info("stage %s: %d samples in %d units", cfg.stage, stream.n_samples, len(stream.units))
    return StageRun(
        pipe, pipe.transformer, text, engine, optimizer, ema, stream, tracker, world, rank, start, bf16
    )


def build_engine(cfg: TrainConfig, transformer: torch.nn.Module, world: int, bf16: bool):
    """The transformer in training mode, its AdamW optimizer, both wrapped by DeepSpeed:
    (engine, optimizer)."""
    import deepspeed

    transformer.train()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        transformer.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    # DeepSpeed steps the scheduler with the optimiser and keeps its state in every checkpoint
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    config = deepspeed_config(cfg, world, bf16)
    engine, *_ = deepspeed.initialize(
        model=transformer, optimizer=optimizer, lr_scheduler=schedule, config=config
    )
    return engine, optimizer


def raw_transformer(
    module: Lumina2Transformer2DModel, zero_stage: int, keep: bool
) -> Lumina2Transformer2DModel | None:
    """An unsharded copy of the trained (non-EMA) weights on the ranks that ``keep`` it; under
    ZeRO-3 every rank must call this (the parameters are gathered collectively)."""
    copy = Lumina2Transformer2DModel.from_config(module.config).eval() if keep else None
    with whole_parameters(module, zero_stage), torch.no_grad():
        if copy is not None:
            pairs = zip(copy.parameters(), module.parameters(), strict=True)
            for target, param in pairs:
                target.copy_(param.detach().to(target.dtype))
    return copy


def finish_stage(cfg: TrainConfig, run: StageRun) -> StageResult:
    """Rank 0 exports the pipeline with the EMA weights, writes the artifacts and ``run.json`` and
    ends the MLflow run; every rank returns the stage's losses (all of them, across resumes)."""
    export = cfg.output_dir / EXPORT_DIR
    all_losses = read_losses(cfg.output_dir)
    run_id, val_loss = "", None
    raw = raw_transformer(run.transformer, cfg.zero_stage, keep=run.rank == 0)  # every rank: ZeRO-3 gathers
    if run.rank == 0:
        final = run.ema.model(run.transformer)
        run.pipe.register_modules(transformer=final)
        save_pipeline(run.pipe, export)
        raw.save_pretrained(export / RAW_TRANSFORMER_DIR, safe_serialization=True)
        val_loss = stage_val_loss(cfg, run.pipe, run.tracker, run.engine.device)  # held-out split
        compositional = stage_compositional(cfg, run.pipe, run.tracker, run.engine.device)
        artifacts = write_artifacts(cfg, run.pipe, all_losses)
        run_id = run.tracker.run_id if run.tracker is not None else ""
        summary = {"mlflow_run_id": run_id, "steps": cfg.steps, "val_loss": val_loss, **compositional}
        (cfg.output_dir / "run.json").write_text(json.dumps(summary))
        finish_tracking(run.tracker, artifacts)
    last = all_losses[-1] if all_losses else float("nan")
    return StageResult(export, cfg.steps, last, all_losses, run_id, val_loss)
