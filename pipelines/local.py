"""The embedded default: run the whole pipeline on this machine with kfp's local runner.

Around the run it starts what a cluster would provide: a loopback S3 server (``moto_server``) as
the DVC remote that versions ``data/raw``, and MLflow (a real ``mlflow server`` on loopback, or
an sqlite store). Everything it starts is stopped on exit.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from common.errors import ConfigError, LuminaError

log = logging.getLogger(__name__)

# kfp's local runner warns, for every task, that cluster-only settings (display names, accelerators)
# have no effect and that the component image is not used (it runs in this venv): known, so hidden.
LOCAL_RUNNER_NOTICES = (
    r".*have no effect in the current local runner.*",
    r".*custom or non-Python base image.*",
)
REPO = Path(__file__).resolve().parents[1]
DATA_BUCKET = "lumina-data"
DVC_FILE = "data.dvc"  # top level: tracks data/ (raw/ inside)


@dataclass
class LocalRun:
    registration: dict[str, Any]
    tracking_uri: str
    report: Path | None
    data_version: str
    pipeline_root: Path
    skipped: str = ""  # why nothing was trained (only_new_data and an unchanged source)


def version_data(data_dir: Path, endpoint: str, store: Path) -> str:
    """``dvc add`` the data folder (→ ``data.dvc``), push it to the loopback S3 remote; return
    the DVC content hash. The loopback server starts empty each run: the remote's objects are
    restored from ``store`` (a folder under the outputs) first and mirrored back after the push,
    so earlier data versions stay pullable."""
    from data_tools.dvc_remote import (
        configure_remote,
        ensure_repo,
        mirror_remote,
        push,
        restore_remote,
        track,
    )
    from services.s3 import ensure_bucket

    repo = REPO
    remote = f"s3://{DATA_BUCKET}/dvc"
    ensure_repo(repo)
    ensure_bucket(DATA_BUCKET, endpoint)
    with mock.patch.dict(os.environ, {"AWS_ENDPOINT_URL": endpoint}):  # the storage layer's S3 client
        restored = restore_remote(store, remote)
    configure_remote(repo, remote, endpoint=endpoint, local=True)
    target = str(data_dir.resolve().relative_to(repo))
    if f"{target}.dvc" != DVC_FILE:
        raise ConfigError(f"the data folder to version is {DVC_FILE.removesuffix('.dvc')}/, not {target}")
    digest = track(repo, target)
    push(repo)
    with mock.patch.dict(os.environ, {"AWS_ENDPOINT_URL": endpoint}):
        added = mirror_remote(remote, store)
    log.info("DVC remote: %d objects restored from %s, %d new mirrored there", restored, store, added)
    return digest


class PipelineFailed(LuminaError):
    """A step of the local run failed: the step, its one-line reason and where the full log is."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Failed|Exception|Refused)\w*): (.+)$")


class TaskLog(io.TextIOBase):
    """Where the tasks' output goes during a local run (kfp's runner prints each task process's
    lines to stdout): the full text to ``pipeline.log``, the console only with ``echo`` (kfp's
    own task status lines still reach the console through logging); the last lines are kept to
    name a failure's reason."""

    def __init__(self, path: Path, echo: bool = False, keep: int = 500) -> None:
        self.path, self.echo = path, echo
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._file = None
        self._redirect = contextlib.redirect_stdout(self)

    def __enter__(self) -> TaskLog:
        self._file = open(self.path, "a", encoding="utf-8")
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)
        self._file.close()

    def write(self, text: str) -> int:
        self._file.write(text)
        self.lines.extend(line for line in text.splitlines() if line.strip())
        if self.echo:
            sys.__stdout__.write(text)
        return len(text)

    def flush(self) -> None:
        self._file.flush()

    def failure(self, message: str) -> PipelineFailed:
        """``step <task> failed: <reason> (full log: <path>)`` from kfp's message and the output."""
        plain = _ANSI.sub("", message).replace("\n", " ")
        found = re.search(r"Inner task failed: '([^']+)'", plain)
        step = found.group(1) if found else "a step"
        reason = next((line.strip().removeprefix("error:").strip() for line in reversed(self.lines)
                       if line.strip().startswith("error: ")), None)  # fmt: skip
        if reason is None:
            matches = (_EXCEPTION_LINE.match(_ANSI.sub("", line)) for line in reversed(self.lines))
            hit = next((m for m in matches if m), None)
            reason = f"{hit.group(1)}: {hit.group(2)}" if hit else "see the log"
        return PipelineFailed(f"step {step} failed: {reason[:500]} (full log: {self.path})")


def find_report(pipeline_root: Path) -> Path | None:
    """The newest evaluation report: the register step's (gate decision, challenger beside champion,
    loss curves, lineage), else the evaluate step's."""
    for step in ("register-op", "evaluate-op"):
        reports = sorted(pipeline_root.glob(f"**/{step}*/report"), key=lambda p: p.stat().st_mtime)
        if reports:
            return reports[-1]
    return None


def _environment(defaults: dict[str, str]):
    """Set the ``defaults`` the environment lacks until the ``with`` block ends."""
    return mock.patch.dict(os.environ, {k: v for k, v in defaults.items() if k not in os.environ})


def run_local(
    source: Path | str,
    out_dir: Path,
    arguments: dict[str, Any],
    *,
    mlflow_server: bool = False,
    dvc_data: Path | None = None,
    parallelism: int = 2,
) -> LocalRun:
    """Run the pipeline locally; ``dvc_data`` (e.g. ``data/raw``) is versioned first when given.
    Shards go under ``out_dir/data`` unless ``arguments`` names a ``data_root``; ``parallelism`` groups
    run at once in each ParallelFor."""
    import kfp.local

    from components.tracking import git_sha
    from pipelines.lumina_pipeline import build_pipeline
    from services.mlflow_server import mlflow_server as start_mlflow
    from services.s3 import DUMMY_CREDENTIALS, REGION, s3_server
    from storage import is_s3

    if is_s3(source):
        source_arg = str(source)
    else:
        source = Path(source)
        if not source.exists():
            raise ConfigError(f"pipeline source not found: {source} (run `make sample-data` first)")
        source_arg = str(source.resolve())
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_version = ""
    with contextlib.ExitStack() as stack:
        # The run's settings reach the component subprocesses through the environment, for this run
        # only: it is restored on exit (the MLflow server and S3 endpoint are gone by then).
        stack.enter_context(_environment({"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}))
        if dvc_data is not None:
            stack.enter_context(_environment({**DUMMY_CREDENTIALS, "AWS_DEFAULT_REGION": REGION}))
            endpoint = stack.enter_context(s3_server())
            data_version = version_data(dvc_data, endpoint, out_dir / "dvc-remote")
            log.info(
                "data versioned: %s.dvc = %s (pushed to s3://%s on %s)",
                dvc_data,
                data_version,
                DATA_BUCKET,
                endpoint,
            )
        if mlflow_server:
            tracking_uri = stack.enter_context(start_mlflow(out_dir / "mlflow"))
        else:
            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out_dir / 'mlflow.db'}"
        stack.enter_context(mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tracking_uri}))
        pipeline_root = out_dir / "kfp"
        kfp.local.init(
            runner=kfp.local.SubprocessRunner(use_venv=False),
            pipeline_root=str(pipeline_root),
            raise_on_error=True,
        )
        args = {
            "mlflow_tracking_uri": tracking_uri,
            "git_sha": git_sha(REPO),
            "data_version": data_version,
            "data_root": str(out_dir / "data"),
            **arguments,
            "source": source_arg,
        }
        log_path = out_dir / "pipeline.log"
        echo = os.environ.get("LUMINA_VERBOSE", "") not in ("", "0")
        with TaskLog(log_path, echo=echo) as task_log, warnings.catch_warnings():
            for notice in LOCAL_RUNNER_NOTICES:  # true of every local run: not worth a console line each task
                warnings.filterwarnings("ignore", message=notice)
            try:
                task = build_pipeline(None, parallelism)(**args)
            except RuntimeError as exc:  # kfp's "Inner task failed: ..."
                raise task_log.failure(str(exc)) from None
        result = json.loads(task.output)
    skipped = result.get("skipped", "") if isinstance(result, dict) else ""
    registration = {} if skipped else result
    return LocalRun(
        registration, tracking_uri, find_report(pipeline_root), data_version, pipeline_root, skipped
    )
