"""MLflow tracking for every component: runs through an ``MlflowClient`` bound to a tracking URI.

No helper here calls ``mlflow.set_tracking_uri`` or the fluent run API: those change process-wide
state (``set_tracking_uri`` even sets ``MLFLOW_TRACKING_URI`` in the environment), which leaks one
caller's store into the next in a long-lived process.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

TRAIN_EXPERIMENT = "lumina-train"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def git_sha(cwd: Path | None = None) -> str:
    """The checkout's commit; in the container image (no git, no .git) the commit it was built
    from (``LUMINA_GIT_SHA``, set by the Dockerfile's ``GIT_SHA`` build argument); else ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LUMINA_GIT_SHA") or "unknown"


def default_tracking_uri(output_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded sqlite store beside the stage outputs."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir.parent / 'mlflow.db').resolve()}"


def artifact_root(tracking_uri: str) -> str | None:
    """Where an embedded store's artifacts go: ``mlartifacts/`` beside its sqlite file (MLflow's own
    default, ``./mlruns`` of the working directory, splits the registry from its files). None for a
    tracking server, whose configured artifact root (S3 on a cluster) applies."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when it does not exist yet (artifacts of an embedded
    store beside it: :func:`artifact_root`)."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    root = artifact_root(str(client.tracking_uri))
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


@dataclass
class ClientRun:
    """An open run: log through ``client`` with ``run_id``; set ``status`` to end it otherwise."""

    client: MlflowClient
    run_id: str
    artifact_uri: str
    status: str = "FINISHED"


@contextlib.contextmanager
def client_run(
    tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None
) -> Iterator[ClientRun]:
    """A run in ``experiment`` for the length of a ``with`` block; it ends ``FAILED`` if the block
    raises, else with the status the block left (``FINISHED`` by default)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags or {})
    handle = ClientRun(client, run.info.run_id, run.info.artifact_uri)
    try:
        yield handle
    except BaseException:
        client.set_terminated(handle.run_id, status="FAILED")
        raise
    client.set_terminated(handle.run_id, status=handle.status)


class MlflowTracker:
    """One MLflow run per stage; metrics are logged by the trainer, artifacts at the end. A run the
    process leaves without :meth:`finish` (the stage raised) is ended ``FAILED`` at exit."""

    def __init__(self, tracking_uri: str, run_name: str, experiment: str = TRAIN_EXPERIMENT):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run = self.client.create_run(experiment_id(self.client, experiment), run_name=run_name)
        atexit.register(self._fail_if_open)

    @classmethod
    def reopen(cls, tracking_uri: str, run_id: str) -> MlflowTracker:
        """Continue an existing run (a resumed stage): set RUNNING again, ended ``FAILED`` at exit
        unless finished. Raises MLflow's error when the run is not in this store."""
        tracker = cls.__new__(cls)
        tracker.client = MlflowClient(tracking_uri=tracking_uri)
        tracker.run = tracker.client.get_run(run_id)
        tracker.client.update_run(run_id, status="RUNNING")
        atexit.register(tracker._fail_if_open)
        return tracker

    def _fail_if_open(self) -> None:
        with contextlib.suppress(Exception):  # at exit: the store may be gone already
            self.client.set_terminated(self.run_id, status="FAILED")

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {
            k: json.dumps(v, default=str) if isinstance(v, dict | list | tuple) else v
            for k, v in params.items()
        }
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        atexit.unregister(self._fail_if_open)
        self.client.set_terminated(self.run_id, status=status)
