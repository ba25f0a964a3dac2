"""DVC versioning of data folders on an S3 remote (``s3://bucket/path`` + ``endpointurl``) or a
local-directory remote, through the ``dvc`` command line of this environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from model.errors import LuminaError


class DvcError(LuminaError):
    """A dvc command failed (its last stderr line is in the message)."""


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    exe = Path(sys.executable).parent / "dvc"
    proc = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DvcError(f"dvc {' '.join(args)} failed: {last}")
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
