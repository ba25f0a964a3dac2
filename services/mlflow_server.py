"""A real ``mlflow server`` on loopback (sqlite backend store, local artifact destination)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from services.process import free_port, http_answers, running


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """Yield the tracking URI of a server storing everything under ``root``; stop it on exit."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root.resolve() / 'mlflow.db'}",
        "--artifacts-destination", str(root.resolve() / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    with running(cmd, http_answers(f"{uri}/health"), log_file=root / "server.log", timeout=timeout):
        yield uri
