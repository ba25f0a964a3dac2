"""One training stage on the DeepSpeed engine: cached features in, checkpoints and a diffusers
pipeline folder (EMA weights) out, metrics to MLflow (or a JSONL file when tracking is off)."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.train.config import TrainConfig
from components.train.data import FeatureCache, build_cache, choose_caption, read_manifest
from model.checkpoint import build_pipeline, load_pipeline, save_pipeline
from model.errors import ConfigError
from model.flow import TimestepSampler, flow_matching_loss

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


def ensure_distributed_env() -> None:
    """Single-process defaults so DeepSpeed starts without a launcher (gloo on CPU)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


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


def micro_batch(
    cfg: TrainConfig, cache: FeatureCache, records: dict, step: int, micro: int, rank: int
) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """The micro batch for (step, micro, rank): a function of the seed alone, so a resumed run
    sees exactly the data, captions, noise and times an uninterrupted run would."""
    rng = random.Random(f"{cfg.seed}:{step}:{micro}:{rank}")
    sizes = sorted(cache.buckets)
    size = rng.choices(sizes, weights=[len(cache.buckets[s]) for s in sizes], k=1)[0]
    ids = [rng.choice(cache.buckets[size]) for _ in range(cfg.micro_batch)]
    texts = [
        ""
        if rng.random() < cfg.caption_dropout
        else choose_caption(
            records[i], rng, cfg.granularity_weights, cfg.language_weights, cfg.system_prompts
        )
        for i in ids
    ]
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    return torch.stack([cache.latents[i] for i in ids]), texts, gen


class Ema:
    """Exponential moving average of the trainable parameters (fp32)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(self.shadow[name].to(param.dtype))


def train_stage(cfg: TrainConfig, tracker=None) -> StageResult:
    """Run one stage; resumes from ``output_dir/checkpoints`` when a checkpoint is there."""
    ensure_distributed_env()
    import deepspeed  # imported late: it initialises its accelerator on import

    if cfg.zero_stage > 2:
        raise ConfigError("zero_stage 3 is not supported yet (EMA needs whole parameters); use 0-2")
    torch.manual_seed(cfg.seed)
    records = read_manifest(cfg.manifest)
    pipe = load_pipeline(cfg.init_from) if cfg.init_from else build_pipeline(cfg.profile, seed=cfg.seed)
    cache = build_cache(
        records,
        resolution=cfg.resolution,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        system_prompts=cfg.system_prompts,
        cache_dir=cfg.resolved_cache_dir,
    )
    by_id = {r.id: r for r in records}

    use_cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    transformer = pipe.transformer.train()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        transformer.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine, *_ = deepspeed.initialize(
        model=transformer, optimizer=optimizer, config=deepspeed_config(cfg, world, bf16)
    )
    rank = engine.global_rank
    ema = Ema(transformer, cfg.ema_decay)

    ckpt_dir = cfg.output_dir / CKPT_DIR
    start = 0
    if (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start = int(client["step"])
        ema.shadow = torch.load(ckpt_dir / f"ema-{start}.pt")
        log.info("resumed stage %s at step %d", cfg.stage, start)

    sampler = TimestepSampler(cfg.timestep_sampling)
    accum = cfg.gradient_accumulation(world)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def velocity(x, t, c, m):
        return engine(x.to(dtype), t.to(dtype), c.to(dtype), m).sample.float()

    losses: list[float] = []
    tick = time.perf_counter()
    for step in range(start, cfg.steps):
        step_loss = step_aux = 0.0
        for micro in range(accum):
            latents, texts, gen = micro_batch(cfg, cache, by_id, step, micro, rank)
            feats, mask = cache.batch_text(texts)
            dev = engine.device
            out = flow_matching_loss(
                velocity, latents.to(dev), feats.to(dev), mask.to(dev),
                sampler=sampler, aux_weight=cfg.aux_weight, generator=gen,
            )  # fmt: skip
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.item() / accum
            step_aux += out.aux.item() / accum
        ema.update(transformer)
        losses.append(step_loss)
        done = step + 1
        if tracker is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            elapsed = time.perf_counter() - tick
            tracker.log_metrics(
                {
                    "loss": step_loss,
                    "aux_loss": step_aux,
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": cfg.global_batch * cfg.log_every / max(elapsed, 1e-9),
                },
                step=done,
            )
            tick = time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{done}", client_state={"step": done})
            if rank == 0:
                torch.save(ema.shadow, ckpt_dir / f"ema-{done}.pt")
                _append_losses(cfg.output_dir, start, losses)
                start, losses = done, []

    export = cfg.output_dir / EXPORT_DIR
    if rank == 0:
        final = copy.deepcopy(transformer).eval()
        ema.copy_to(final)
        pipe.register_modules(transformer=final)
        save_pipeline(pipe, export)
    all_losses = read_losses(cfg.output_dir)
    return StageResult(export, cfg.steps, all_losses[-1] if all_losses else float("nan"), all_losses)


def _append_losses(output_dir: Path, start: int, losses: list[float]) -> None:
    """Per-step losses, one JSON line per step (kept across resumes: a resumed run rewrites the
    steps after its checkpoint)."""
    path = output_dir / "losses.jsonl"
    kept = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    kept = [row for row in kept if row["step"] <= start]
    kept += [{"step": start + i + 1, "loss": v} for i, v in enumerate(losses)]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def read_losses(output_dir: Path) -> list[float]:
    path = output_dir / "losses.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]
