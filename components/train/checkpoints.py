"""Checkpoint bookkeeping for a stage's ``output_dir/checkpoints`` folder.

Each checkpoint is one DeepSpeed tag folder, ``step{N}/``, holding the engine's files and the EMA
weights (``ema.pt``). It counts only once complete: after every file is written (and every rank
is past a barrier) rank 0 writes ``step{N}/COMPLETE`` (JSON: step, time, each file's size) with
temp file + rename, so a marker is either whole or absent. Resume takes the newest complete
checkpoint, never DeepSpeed's ``latest`` file (which DeepSpeed updates before the EMA weights are
written); retention keeps the last N complete ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from time import monotonic

from common.errors import LuminaError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
EMA_FILE = "ema.pt"
_TAG = re.compile(r"step(\d+)")
_LEGACY_EMA = re.compile(r"ema-(\d+)\.pt")  # the EMA file's place before tag folders held it


class CheckpointError(LuminaError):
    """No checkpoint of a stage could be resumed from although complete ones are there."""


def tag_name(step: int) -> str:
    return f"step{step}"


def tag_step(name: str) -> int | None:
    """The step of a tag folder name (``step12`` -> 12); None for anything else."""
    match = _TAG.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Checkpoint:
    """One tag folder; ``problem`` says why it cannot be resumed from (None: complete)."""

    tag: str
    step: int
    path: Path
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.problem is None


def _files(tag_dir: Path) -> dict[str, int]:
    return {
        p.relative_to(tag_dir).as_posix(): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file, or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def mark_complete(tag_dir: Path, step: int) -> dict:
    """Record ``tag_dir`` as a complete checkpoint of ``step`` (call once all its files are
    written, by every rank; rank 0 only). Returns the marker's content."""
    files = _files(tag_dir)
    if EMA_FILE not in files:
        raise FileNotFoundError(f"{tag_dir / EMA_FILE} is missing: the checkpoint is not complete")
    record = {"step": step, "time": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
    write_atomic(tag_dir / MARKER, json.dumps(record, indent=1) + "\n")
    return record


def unmark(tag_dir: Path) -> None:
    """Drop ``tag_dir``'s marker (before its files are rewritten or deleted)."""
    (tag_dir / MARKER).unlink(missing_ok=True)


def problem(tag_dir: Path, step: int) -> str | None:
    """Why ``tag_dir`` is not a complete checkpoint of ``step``, or None when it is."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return f"has no {MARKER} marker (its save did not finish)"
    try:
        record = json.loads(marker.read_text())
        files = {str(k): int(v) for k, v in record["files"].items()}
        marked = int(record["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"has an unreadable {MARKER} marker"
    if marked != step:
        return f"has a {MARKER} marker for step {marked}"
    if EMA_FILE not in files:
        return f"lists no {EMA_FILE} in its {MARKER} marker"
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"lacks {rel}"
        if (actual := path.stat().st_size) != size:
            return f"has {rel} of {actual} bytes, {size} when it was saved"
    return None


def scan(ckpt_dir: Path) -> list[Checkpoint]:
    """Every tag folder under ``ckpt_dir``, newest step first, each with its problem (if any)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        step = tag_step(path.name)
        if step is not None and path.is_dir():
            found.append(Checkpoint(path.name, step, path, problem(path, step)))
    return sorted(found, key=lambda c: c.step, reverse=True)


def complete_checkpoints(ckpt_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints, newest first."""
    return [c for c in scan(ckpt_dir) if c.complete]


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints; delete every tag folder (complete or not)
    older than the oldest kept one, and old-layout ``ema-{N}.pt`` files of those steps. Newer
    incomplete folders stay (the run rewrites them when it reaches their step). Returns what was
    deleted. Each folder loses its marker first, so a kill mid-delete leaves an incomplete one."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    complete = complete_checkpoints(ckpt_dir)
    if not complete:
        return []
    oldest_kept = complete[:keep][-1].step
    removed = []
    for ckpt in scan(ckpt_dir):
        if ckpt.step < oldest_kept:
            unmark(ckpt.path)
            shutil.rmtree(ckpt.path)
            removed.append(ckpt.path)
    for path in sorted(ckpt_dir.iterdir()):
        match = _LEGACY_EMA.fullmatch(path.name)
        if match and int(match.group(1)) < oldest_kept and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def resume_from(
    candidates: list[Checkpoint], load: Callable[[Checkpoint], str | None], where: str = "checkpoints"
) -> Checkpoint | None:
    """The checkpoint to resume from: the newest complete one that ``load`` restores (``load``
    returns None on success, else what went wrong). Incomplete and unloadable ones are skipped with
    a warning naming the one used instead; with no complete one at all the run starts over (None,
    with a warning if there were incomplete ones). When complete ones exist but none loads,
    :class:`CheckpointError` (the engine may be half restored: starting over would be wrong)."""
    skipped: list[str] = []
    failed = False
    for ckpt in candidates:
        if not ckpt.complete:
            skipped.append(f"{ckpt.tag} {ckpt.problem}")
            continue
        error = load(ckpt)
        if error is None:
            if skipped:
                log.warning(
                    "skipped checkpoint %s; resuming from %s (step %d) instead",
                    "; ".join(skipped), ckpt.tag, ckpt.step,
                )  # fmt: skip
            return ckpt
        failed = True
        skipped.append(f"{ckpt.tag} could not be loaded ({error})")
    if failed:
        raise CheckpointError(
            f"no checkpoint in {where} could be resumed from: {'; '.join(skipped)}."
            f" Move {where} aside to start the stage over"
        )
    if skipped:
        log.warning("no complete checkpoint in %s (%s); starting from step 0", where, "; ".join(skipped))
    return None


class CheckpointSchedule:
    """When to checkpoint: every ``every_steps`` steps, at the last step, and (with ``minutes``)
    once that much wall-clock time has passed since the last checkpoint (or the start)."""

    def __init__(self, every_steps: int, total_steps: int, minutes: float | None = None):
        self.every_steps = every_steps
        self.total_steps = total_steps
        self.minutes = minutes
        self.last = monotonic()

    def due_by_steps(self, done: int) -> bool:
        return done % self.every_steps == 0 or done == self.total_steps

    def due_by_time(self) -> bool:
        return self.minutes is not None and monotonic() - self.last >= self.minutes * 60

    def saved(self) -> None:
        self.last = monotonic()
