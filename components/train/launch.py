"""Process-launch helpers for training (kept here, not in the dev-only ``services`` package)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (a rendezvous port for a single-process run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
