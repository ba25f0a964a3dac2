"""Process-launch helpers for training (kept here, not in the dev-only ``services`` package)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (a rendezvous port for a single-process run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")  # the NVIDIA and ROCm drivers' control devices


def local_gpu_count() -> int:
    """The GPUs this process sees; on a machine without a GPU driver, 0 without importing torch (the
    train task's own process only launches the stage; importing torch there costs ~2 s)."""
    if not any(Path(device).exists() for device in GPU_DEVICE_FILES):
        return 0
    import torch

    return torch.cuda.device_count()


def stage_work_dir(work_root: str, run_id: str, stage: str) -> Path:
    """Where a pipeline's train step keeps a stage's outputs and checkpoints.

    With ``work_root`` (the cache PVC on a cluster) the folder is a stable key, ``<root>/<run>/<stage>``,
    so a retried or preempted task finds the previous attempt's complete checkpoints and resumes;
    without it, a fresh temporary folder (the embedded default)."""
    if not work_root:
        return Path(tempfile.mkdtemp(prefix=f"train-{stage}-"))
    run = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.") or "run"
    folder = Path(work_root) / run / stage
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def stage_work(work_root: str, run_id: str, stage: str) -> Iterator[Path]:
    """:func:`stage_work_dir` for the train step. A temporary folder (no ``work_root``) holds the
    stage's checkpoints, which nothing resumes from: it is removed when the step succeeds, and kept,
    with its path on stderr, when the step fails. A ``work_root`` folder is always kept (resume)."""
    work = stage_work_dir(work_root, run_id, stage)
    try:
        yield work
    except BaseException:
        if not work_root:
            print(f"stage {stage} failed; its work folder is kept for inspection: {work}", file=sys.stderr)
        raise
    if not work_root:
        shutil.rmtree(work, ignore_errors=True)


RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def launch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for a stage process started by the pipeline's train step: the caller's, less
    any rendezvous settings. The stage's rendezvous is its own (torchrun's, or a port it picks):
    an inherited ``MASTER_PORT`` may still be bound by the caller's process (one that trained
    in-process before, e.g. a test), which failed the stage with EADDRINUSE."""
    return {k: v for k, v in environ.items() if k not in RENDEZVOUS_VARIABLES}


def base_model_source(base_model: str, work: Path) -> str:
    """The first stage's ``--init-from`` for ``base_model``: an ``s3://`` or ``models:/`` model
    downloaded into ``<work>/inputs/base`` (the shared volume on a cluster; reused by a retry), a
    folder in place, a hub id as is (loaded from the Hugging Face cache)."""
    from storage.models import resolve_model

    return resolve_model(base_model, work / "inputs" / "base")


def shared_copy(source: str | Path, work: Path, name: str) -> Path:
    """``source`` (a file or folder the KFP task downloaded) copied to ``<work>/inputs/<name>``, a
    path the TrainJob's pods see on the shared volume (replaced whole: a retry gets this attempt's)."""
    source, target = Path(source), work / "inputs" / name
    if target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return target


def shared_init(init_path: str | Path, metadata: Mapping[str, object], work: Path) -> Path:
    """The previous stage's pipeline folder on the shared volume: its export in place when the
    artifact says where that is and it is there (no copy of the weights), else a copy."""
    export = str(metadata.get("export_dir") or "")
    if export and (Path(export) / "model_index.json").is_file():
        return Path(export)
    return shared_copy(init_path, work, "init")


PERMANENT_FAILURE = "permanent-failure.txt"
USER_ERROR_EXIT = 2  # what the CLIs exit with for a mistake only the user can fix (common.cli)


class StageConfigError(RuntimeError):
    """The stage process failed with a configuration error: retrying cannot help."""


def run_stage_process(cmd: list[str], work: Path, env: Mapping[str, str]) -> None:
    """Run the stage process (its stderr passed through). Exit 2 — a bad config, manifest or
    model path — is written to ``<work>/permanent-failure.txt`` and raised as
    :class:`StageConfigError`; a retried task (same work folder) fails at once with that reason
    instead of running the stage again. Any other failure is
    ``subprocess.CalledProcessError`` (a retry runs the stage again and resumes)."""
    marker = work / PERMANENT_FAILURE
    if marker.is_file():
        raise StageConfigError(f"not retried: an earlier attempt failed: {marker.read_text().strip()}")
    last_error = ""
    with subprocess.Popen(cmd, env=dict(env), stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("error: "):
                last_error = line.removeprefix("error: ").strip()
    if proc.returncode == USER_ERROR_EXIT:
        reason = last_error or "configuration error (exit 2)"
        marker.write_text(reason + "\n")
        raise StageConfigError(f"stage failed: {reason}")
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
