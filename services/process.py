"""Run a server process for the length of a ``with`` block, probing it until it answers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import requests


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_answers(url: str) -> Callable[[], bool]:
    """Probe: true once ``url`` gives any HTTP answer (the server is accepting requests)."""

    def probe() -> bool:
        try:
            requests.get(url, timeout=2)
        except requests.RequestException:
            return False
        return True

    return probe


@contextlib.contextmanager
def running(
    cmd: Sequence[str], probe: Callable[[], bool], *, log_file: Path | None = None, timeout: float = 120.0
) -> Iterator[subprocess.Popen]:
    """Start ``cmd``, wait until ``probe()`` is true, yield the process, terminate it on exit."""
    log = open(log_file, "w") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not probe():
            if proc.poll() is not None:
                tail = log_file.read_text()[-2000:] if log_file else ""
                raise RuntimeError(f"{Path(cmd[0]).name} exited with code {proc.returncode}: {tail}")
            if time.time() > deadline:
                raise TimeoutError(f"{Path(cmd[0]).name} did not become ready in {timeout:.0f} s")
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_file:
            log.close()
