"""One training stage on the DeepSpeed engine: cached features in, checkpoints and a diffusers
pipeline folder (EMA weights) out, metrics to MLflow (or a JSONL file when tracking is off)."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import Lumina2Transformer2DModel
from PIL import Image

from common.errors import ConfigError, error_summary
from components.latents.cache import index_files
from components.tracking import MlflowTracker, default_tracking_uri, file_sha256, git_sha
from components.train import checkpoints
from components.train.config import TrainConfig
from components.train.data import choose_caption, fingerprint, pad_features
from components.train.launch import free_port
from components.train.loader import (
    LOADER_STATE,
    Position,
    StageFilter,
    StageStream,
    load_position,
    save_positions,
)
from components.train.sources import encode_manifest, text_feature_cache, usable_index
from model.checkpoint import build_pipeline, load_pipeline, save_pipeline
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


def init_distributed(owned_port: bool, attempts: int = 5, timeout_minutes: float = 30.0) -> None:
    """``deepspeed.init_distributed()``; when the port is ours, it is picked right before each bind
    attempt (and again if another process took it in between: EADDRINUSE), instead of failing."""
    import deepspeed

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


@contextlib.contextmanager
def whole_parameters(module: torch.nn.Module, zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3 gather the partitioned parameters for the block (read only); else nothing."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


class Ema:
    """Exponential moving average of the trainable parameters (fp32, whole tensors on every rank;
    under ZeRO-3 each update gathers the partitioned parameters)."""

    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int = 0):
        self.decay = decay
        self.zero_stage = zero_stage
        with whole_parameters(module, zero_stage):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        with whole_parameters(module, self.zero_stage):
            for name, param in module.named_parameters():
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(self.shadow[name].to(param.dtype))

    def model(self, like: Lumina2Transformer2DModel) -> Lumina2Transformer2DModel:
        """A fresh (unsharded) transformer with ``like``'s config and the EMA weights."""
        fresh = Lumina2Transformer2DModel.from_config(like.config).eval()
        self.copy_to(fresh)
        return fresh


def train_stage(cfg: TrainConfig, tracker: MlflowTracker | None = None) -> StageResult:
    """Run one stage; resumes from ``output_dir/checkpoints`` when a checkpoint is there.

    With ``cfg.track`` (default) rank 0 opens an MLflow run (tracking URI from
    ``MLFLOW_TRACKING_URI``, else sqlite beside the outputs) unless a tracker is passed in.
    """
    owned_port = ensure_distributed_env()
    import deepspeed  # imported late: it initialises its accelerator on import

    torch.manual_seed(cfg.seed)
    if not cfg.manifest.is_file():
        raise ConfigError(f"training manifest not found: {cfg.manifest}")
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(cfg.init_from) if cfg.init_from else build_pipeline(cfg.profile, seed=cfg.seed)
    init_distributed(owned_port, timeout_minutes=cfg.collective_timeout_minutes)
    import torch.distributed as dist

    flt = StageFilter(cfg.resolution, fingerprint(pipe.vae), str(cfg.stage))
    index = stage_index(cfg, pipe, flt)
    text = stage_text_features(cfg, pipe, index, flt)

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
    ema = Ema(transformer, cfg.ema_decay, cfg.zero_stage)
    ckpt_dir = cfg.output_dir / CKPT_DIR
    start, position = resume(engine, ema, ckpt_dir)
    if start:
        log.info("resumed stage %s at step %d (data at %s)", cfg.stage, start, position)
    continued = False
    if tracker is None and cfg.track and rank == 0:
        tracker, continued = stage_tracker(cfg, start)
    if tracker is not None:
        if not continued:  # a continued run has its params (MLflow params cannot change)
            tracker.log_params(cfg.model_dump(mode="json"))
        tracker.set_tags(
            {
                "stage": str(cfg.stage),
                "profile": cfg.profile,
                "git_sha": git_sha(),
                "dataset_sha256": file_sha256(cfg.manifest),
                "init_from": str(cfg.init_from or "scratch"),
                "world_size": str(world),
            }
        )
    stream = StageStream(
        index, flt, micro_batch=cfg.micro_batch, seed=cfg.seed, rank=rank, world=world,
        unit_size=cfg.loader_unit, workers=cfg.loader_workers, start=position,
    )  # fmt: skip
    log.info("stage %s: %d samples in %d units", cfg.stage, stream.n_samples, len(stream.units))

    sampler = TimestepSampler(cfg.timestep_sampling)
    accum = cfg.gradient_accumulation(world)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def velocity(x, t, c, m):
        return engine(x.to(dtype), t.to(dtype), c.to(dtype), m).sample.float()

    losses: list[float] = []
    tick, images, tokens = time.perf_counter(), 0, 0
    patch = transformer.config.patch_size
    schedule = checkpoints.CheckpointSchedule(cfg.checkpoint_every, cfg.steps, cfg.checkpoint_minutes)
    for step in range(start, cfg.steps):
        step_loss = step_aux = 0.0
        for micro in range(accum):
            latents, texts, gen = micro_batch(cfg, stream, step, micro, rank)
            dev = engine.device
            feats, mask = caption_features(cfg, text, pipe, texts, dev)
            out = flow_matching_loss(
                velocity, latents.to(dev), feats.to(dev), mask.to(dev),
                sampler=sampler, aux_weight=cfg.aux_weight, generator=gen,
            )  # fmt: skip
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.item() / accum
            step_aux += out.aux.item() / accum
            images += latents.shape[0]
            tokens += latents.shape[0] * (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
            tokens += int(mask.sum())
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
                    # this rank's throughput (multiply by the world size for the job's)
                    "images_per_s": images / max(elapsed, 1e-9),
                    "tokens_per_s": tokens / max(elapsed, 1e-9),
                },
                step=done,
            )
            tick, images, tokens = time.perf_counter(), 0, 0
        if tracker is not None and cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            snapshot = ema.model(transformer)
            grid_pipe = copy.copy(pipe)
            grid_pipe.register_modules(transformer=snapshot)
            tracker.log_artifact(
                sample_grid(cfg, grid_pipe, cfg.output_dir / f"samples-{done:06d}.png"), "samples"
            )
            transformer.train()
        due = schedule.due_by_steps(done)
        if cfg.checkpoint_minutes is not None:  # rank 0's clock decides for every rank
            flag = torch.tensor([int(due or schedule.due_by_time())], device=engine.device)
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        if due:
            if rank == 0:
                _append_losses(cfg.output_dir, start, losses)  # before the marker: resume rewrites later rows
                start, losses = done, []
            save_checkpoint(engine, ema, ckpt_dir, done, cfg.keep_checkpoints, stream.position)
            schedule.saved()
    stream.close()

    export = cfg.output_dir / EXPORT_DIR
    all_losses = read_losses(cfg.output_dir)
    if rank == 0:
        final = ema.model(transformer)
        pipe.register_modules(transformer=final)
        save_pipeline(pipe, export)
        artifacts = write_artifacts(cfg, pipe, all_losses)
        run_id = tracker.run_id if tracker is not None else ""
        (cfg.output_dir / "run.json").write_text(json.dumps({"mlflow_run_id": run_id, "steps": cfg.steps}))
        if tracker is not None:
            for path in artifacts:
                tracker.log_artifact(path)
            tracker.finish()
    else:
        run_id = ""
    final = all_losses[-1] if all_losses else float("nan")
    return StageResult(export, cfg.steps, final, all_losses, run_id)


RUN_FILE = "mlflow_run.json"


def stage_tracker(cfg: TrainConfig, start: int) -> tuple[MlflowTracker, bool]:
    """The stage's MLflow run and whether it continues an earlier one: a stage resumed from a
    checkpoint continues the run it started (its id kept in ``output_dir/mlflow_run.json``, the
    run set RUNNING again, tagged ``resumed_at_step``); a stage that starts over (no complete
    checkpoint) or whose run is gone gets a new run, the earlier one ended ``KILLED`` and linked
    by the ``previous_run`` tag."""
    uri, path = default_tracking_uri(cfg.output_dir), cfg.output_dir / RUN_FILE
    saved = json.loads(path.read_text()).get("run_id") if path.is_file() else None
    if saved and start > 0:
        try:
            tracker = MlflowTracker.reopen(uri, saved)
        except Exception as exc:  # MlflowException: the run is not in this store
            log.warning(
                "cannot continue MLflow run %s (%s); starting a new one", saved, error_summary(exc, 200)
            )
        else:
            tracker.set_tags({"resumed_at_step": str(start)})
            log.info("continuing MLflow run %s at step %d", saved, start)
            return tracker, True
    tracker = MlflowTracker(uri, run_name=f"{cfg.stage}-{cfg.profile}")
    if saved:
        tracker.set_tags({"previous_run": saved})
        with contextlib.suppress(Exception):  # the old run may be in another store
            if tracker.client.get_run(saved).info.status == "RUNNING":
                tracker.client.set_terminated(saved, status="KILLED")
    path.write_text(json.dumps({"run_id": tracker.run_id}))
    return tracker, False


def save_checkpoint(engine, ema: Ema, ckpt_dir: Path, step: int, keep: int, position: Position) -> None:
    """Write then mark: the DeepSpeed tag folder ``step{N}`` (all ranks), the EMA weights and every
    rank's loader position in it (rank 0), a barrier, then rank 0's ``COMPLETE`` marker and the
    pruning of old checkpoints."""
    import torch.distributed as dist

    tag_dir = ckpt_dir / checkpoints.tag_name(step)
    rank = dist.get_rank()
    if rank == 0:
        checkpoints.unmark(tag_dir)  # a stale marker must not vouch for files being rewritten
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state={"step": step})
    positions: list = [None] * dist.get_world_size()
    dist.all_gather_object(positions, position)
    if rank == 0:
        torch.save(ema.shadow, tag_dir / checkpoints.EMA_FILE)
        save_positions(tag_dir / LOADER_STATE, positions)
    dist.barrier()
    if rank == 0:
        checkpoints.mark_complete(tag_dir, step)
        for path in checkpoints.prune(ckpt_dir, keep):
            log.info("removed old checkpoint %s", path)


def resume(engine, ema: Ema, ckpt_dir: Path) -> tuple[int, Position | None]:
    """Restore the newest complete checkpoint (rank 0 lists them; every rank must load a tag for
    it to count); return its step and this rank's loader position (0, None when there is none)."""
    import torch.distributed as dist

    box = [checkpoints.scan(ckpt_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)

    def load(ckpt: checkpoints.Checkpoint) -> str | None:
        error = None
        try:
            device = next(iter(ema.shadow.values())).device
            shadow = torch.load(ckpt.path / checkpoints.EMA_FILE, map_location=device)
            if not isinstance(shadow, dict) or shadow.keys() != ema.shadow.keys():
                raise ValueError(f"{checkpoints.EMA_FILE} does not hold this model's EMA weights")
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=ckpt.tag)
            if path is None:
                raise FileNotFoundError("DeepSpeed found no checkpoint files")
            if int(client["step"]) != ckpt.step:
                raise ValueError(f"it holds step {client['step']}")
        except Exception as exc:  # any failure to read a checkpoint means: try the previous one
            error = error_summary(exc, 300)
        ok = torch.tensor([int(error is None)], device=engine.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and not ok.item():
            error = "failed on another rank"
        if error is None:
            ema.shadow = shadow
        return error

    chosen = checkpoints.resume_from(box[0], load, where=str(ckpt_dir))
    if chosen is None:
        return 0, None
    return chosen.step, load_position(chosen.path / LOADER_STATE, dist.get_rank(), dist.get_world_size())


def write_artifacts(cfg: TrainConfig, pipe, losses: list[float]) -> list[Path]:
    """Config, loss curve and a sample grid on fixed prompts and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = cfg.output_dir
    config_path = out / "config.json"
    config_path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    curve = out / "loss_curve.png"
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="loss", title=f"{cfg.stage} ({cfg.profile})")
    fig.tight_layout()
    fig.savefig(curve)
    plt.close(fig)
    grid_path = sample_grid(cfg, pipe, out / "samples.png")
    return [config_path, curve, grid_path, out / "losses.jsonl"]


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
