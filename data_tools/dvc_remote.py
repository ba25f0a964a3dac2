"""DVC versioning of data folders on an S3 remote (``s3://bucket/path`` + ``endpointurl``) or a
local-directory remote, through the ``dvc`` command line of this environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common.errors import LuminaError


class DvcError(LuminaError):
    """A dvc command failed (DVC's own error line is in the message) or ran past its time limit."""


TIMEOUT_ENV = "LUMINA_DVC_TIMEOUT"  # seconds a dvc command may take (default 300)
_NOISE = ("Having any troubles?", "Hit us up at", "https://dvc.org/support")


def error_line(stderr: str) -> str:
    """DVC's own error (the first ``ERROR:`` line, prefix dropped), not its closing support notice."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("ERROR:"):
            return line.removeprefix("ERROR:").strip()
    useful = [line for line in lines if not any(noise in line for noise in _NOISE)]
    return (useful or ["(no output)"])[-1]


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run ``dvc`` of this environment; one-line :class:`DvcError` on failure or after ``timeout``
    seconds (default ``LUMINA_DVC_TIMEOUT`` or 300: an unreachable remote is retried by DVC for
    minutes)."""
    exe = Path(sys.executable).parent / "dvc"
    limit = timeout if timeout is not None else float(os.environ.get(TIMEOUT_ENV) or 300)
    try:
        proc = subprocess.run(
            [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        raise DvcError(
            f"dvc {' '.join(args)} timed out after {limit:g} s (remote unreachable? raise {TIMEOUT_ENV})"
        ) from None
    if proc.returncode != 0:
        raise DvcError(f"dvc {' '.join(args)} failed: {error_line(proc.stderr)}")
    return proc.stdout


def ensure_repo(repo: Path, env: dict[str, str] | None = None) -> None:
    """``dvc init`` the repository if it has no ``.dvc`` folder yet."""
    if not (repo / ".dvc").is_dir():
        dvc("init", "-q", cwd=repo, env=env)


def configure_remote(repo: Path, url: str, *, name: str = "storage", endpoint: str | None = None,
                     env: dict[str, str] | None = None, local: bool = False) -> None:  # fmt: skip
    """Add (or replace) the default remote: ``s3://bucket/path`` with an optional endpoint, or a
    local folder. Credentials stay in the environment, never in the config. ``local`` writes to
    ``.dvc/config.local`` (not committed), e.g. for a loopback endpoint that changes per run."""
    scope = ["--local"] if local else []
    dvc("remote", "add", *scope, "--force", "--default", name, url, cwd=repo, env=env)
    if endpoint:
        dvc("remote", "modify", *scope, name, "endpointurl", endpoint, cwd=repo, env=env)


def track(repo: Path, path: str, env: dict[str, str] | None = None) -> str:
    """``dvc add`` a data folder; returns the content hash recorded in its ``.dvc`` file."""
    import yaml

    dvc("add", path, cwd=repo, env=env)
    meta = yaml.safe_load((repo / f"{path}.dvc").read_text())
    return meta["outs"][0]["md5"]


def push(repo: Path, env: dict[str, str] | None = None) -> None:
    dvc("push", cwd=repo, env=env)


def pull(repo: Path, env: dict[str, str] | None = None) -> None:
    dvc("pull", cwd=repo, env=env)


def mirror_remote(remote: str, store: Path) -> int:
    """Copy the remote's objects that ``store`` (a local folder) lacks into it; returns how many.
    The embedded default's loopback S3 server keeps objects in memory: this mirror is what makes
    its data versions outlive the run."""
    from storage import download_file, list_objects

    prefix = remote.rstrip("/") + "/"
    copied = 0
    for obj in list_objects(prefix, must_exist=False):
        target = store / obj.uri[len(prefix) :]
        if not target.is_file() or target.stat().st_size != obj.size:
            download_file(obj.uri, target)
            copied += 1
    return copied


def restore_remote(store: Path, remote: str) -> int:
    """Upload a mirror (:func:`mirror_remote`) into a fresh remote; returns how many objects."""
    from storage import join, upload_file

    count = 0
    for path in sorted(p for p in store.rglob("*") if p.is_file()) if store.is_dir() else []:
        upload_file(path, join(remote, path.relative_to(store).as_posix()))
        count += 1
    return count
