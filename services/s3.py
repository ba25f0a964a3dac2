"""A real S3-compatible server on loopback (``moto_server``) for the embedded default and tests.

Users point the same code at AWS or MinIO by setting ``AWS_ENDPOINT_URL`` (or the DVC remote's
``endpointurl``) and credentials; nothing here is a mock object.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from services.process import free_port, http_answers, running
from storage import s3_client  # the project's one S3 client factory (re-exported for callers here)

__all__ = ["DUMMY_CREDENTIALS", "REGION", "ensure_bucket", "moto_binary", "s3_client", "s3_server"]

DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lumina", "AWS_SECRET_ACCESS_KEY": "lumina-secret"}
REGION = "us-east-1"


def moto_binary() -> Path:
    """``moto_server`` installed beside this interpreter."""
    path = Path(sys.executable).parent / "moto_server"
    if not path.is_file():
        raise FileNotFoundError(f"moto_server not found next to {sys.executable}; install moto[server]")
    return path


@contextlib.contextmanager
def s3_server(port: int | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Start ``moto_server -H 127.0.0.1 -p PORT``, yield its endpoint URL, stop it on exit."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [str(moto_binary()), "-H", "127.0.0.1", "-p", str(port)]
    with running(cmd, http_answers(endpoint), timeout=timeout):
        yield endpoint


def ensure_bucket(bucket: str, endpoint: str | None = None) -> None:
    """Create the bucket if it is missing (DVC push does not create buckets)."""
    client = s3_client(endpoint)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
