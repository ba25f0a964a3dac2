"""Staged downloads of a diffusers pipeline folder into a local ``dest`` (reused when complete).

A download lands in ``dest/.partial`` and is moved into ``dest`` only when it is complete, together
with a marker file naming the source, so a second fetch of the same source (an init container, then
the server) reuses the folder. ``dest`` must be empty or hold only an earlier download: nothing else
in it is ever deleted. Failures are :class:`~common.errors.WeightsNotFoundError` with one-line messages.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from common.errors import WeightsNotFoundError

MARKER = ".lumina-source.json"
MODEL_INDEX = "model_index.json"


def find_pipeline_folder(root: Path, max_depth: int = 3) -> Path | None:
    """``root`` or the shallowest folder below it (up to ``max_depth``) holding ``model_index.json``."""
    frontier = [root]
    for _ in range(max_depth + 1):
        for folder in frontier:
            if (folder / MODEL_INDEX).is_file():
                return folder
        frontier = sorted(
            p for f in frontier for p in f.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not frontier:
            return None
    return None


def cached_download(dest: Path, source: str) -> Path | None:
    """The pipeline folder an earlier complete download of ``source`` left in ``dest``, else None."""
    marker = dest / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if info.get("source") != source:
        return None
    folder = dest / info.get("folder", ".")
    return folder if (folder / MODEL_INDEX).is_file() else None


def previous_entries(dest: Path) -> list[str]:
    """Top-level names an earlier download wrote into ``dest`` (from its marker)."""
    try:
        names = json.loads((dest / MARKER).read_text()).get("entries", [])
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


LOCK = ".lock"


@contextlib.contextmanager
def download_lock(dest: Path) -> Iterator[None]:
    """Hold ``dest/.lock`` exclusively (``flock``) for a download into ``dest``: a second fetch of
    the same folder (another process, pod or thread) waits, then finds the finished download,
    instead of deleting the first one's ``.partial`` under it."""
    import fcntl

    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start_staging(dest: Path) -> Path:
    """A fresh ``dest/.partial``. ``dest`` must be empty or hold only an earlier download: nothing
    else in it is ever deleted."""
    dest.mkdir(parents=True, exist_ok=True)
    ours = {MARKER, ".partial", LOCK, "lost+found", *previous_entries(dest)}  # lost+found: a volume root
    foreign = sorted(child.name for child in dest.iterdir() if child.name not in ours)
    if foreign:
        raise WeightsNotFoundError(
            f"download folder {dest} holds other files ({', '.join(foreign[:3])}...); use an empty folder"
            if len(foreign) > 3
            else f"download folder {dest} holds other files ({', '.join(foreign)}); use an empty folder"
        )
    staging = dest / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def abandon_staging(staging: Path | None) -> None:
    """Remove an unfinished download."""
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)


def finish_staging(dest: Path, source: str, staging: Path) -> Path:
    """Move a complete download from ``staging`` into ``dest``, write the marker and return the
    pipeline folder inside ``dest``."""
    folder = find_pipeline_folder(staging)
    if folder is None:
        abandon_staging(staging)
        raise WeightsNotFoundError(f"{source} holds no diffusers pipeline ({MODEL_INDEX} not found)")
    for name in previous_entries(dest):  # replace an older download (of another source)
        old = dest / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    entries = sorted(child.name for child in staging.iterdir())
    for name in entries:
        (staging / name).rename(dest / name)
    staging.rmdir()
    relative = folder.relative_to(staging)
    info = {"source": source, "folder": str(relative), "entries": entries}
    (dest / MARKER).write_text(json.dumps(info))
    return dest / relative
