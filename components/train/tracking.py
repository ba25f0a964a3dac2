"""MLflow tracking for stage runs: params (config, git sha, dataset hash), metrics, artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow

EXPERIMENT = "lumina-train"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_sha(cwd: Path | None = None) -> str:
    """The checkout's commit, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_tracking_uri(output_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded sqlite store beside the stage outputs."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir.parent / 'mlflow.db').resolve()}"


class MlflowTracker:
    """One MLflow run per stage; metrics are logged by the trainer, artifacts at the end."""

    def __init__(self, tracking_uri: str, run_name: str, experiment: str = EXPERIMENT):
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {
            k: json.dumps(v, default=str) if isinstance(v, dict | list | tuple) else v
            for k, v in params.items()
        }
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)
