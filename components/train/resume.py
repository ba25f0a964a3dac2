"""Saving and resuming a stage on the DeepSpeed engine: when a checkpoint is due, writing one
(engine, EMA weights, loader positions, then the complete marker), restoring the newest complete
one, and the per-step loss record kept across resumes. The file bookkeeping (markers, scanning,
retention, the schedule) is :mod:`components.train.checkpoints`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from common.errors import error_summary
from components.train import checkpoints
from components.train.ema import Ema
from components.train.loader import LOADER_STATE, Position, load_position, save_positions

log = logging.getLogger(__name__)


def checkpoint_due(schedule: checkpoints.CheckpointSchedule, done: int, device) -> bool:
    """Whether to checkpoint after step ``done``: by steps, or (with ``minutes``) by rank 0's
    clock, which decides for every rank."""
    import torch.distributed as dist

    due = schedule.due_by_steps(done)
    if schedule.minutes is not None:
        flag = torch.tensor([int(due or schedule.due_by_time())], device=device)
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


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


def append_losses(output_dir: Path, start: int, losses: list[float]) -> None:
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
