"""Image shards: WebDataset-style ``.tar`` files written once, read by byte range.

Written with the standard library's ``tarfile`` (no extra dependency): a member's data offset and
size are known the moment it is added, so the manifest can name ``(shard, member, offset, size)``
and any step reads one image with a single range request (``storage.read_range``) instead of
downloading or scanning the shard, while ``tar -x`` and the ``webdataset`` library still read the
files as ordinary WebDataset shards (members ``<key>.<ext>``).

A shard is built in a local temporary file and uploaded only when closed, so a shard URI either
holds a complete tar or nothing; a retried writer overwrites its own shards and nothing else.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import error_summary
from storage.io import StorageError, join, read_range, upload_file
from storage.stream import ordered_map

REF_COLUMNS = ("shard", "member", "offset", "size")


@dataclass(frozen=True)
class MemberRef:
    """Where one image's bytes are: the shard URI, the member name, its data offset and size."""

    shard: str
    member: str
    offset: int
    size: int

    def as_row(self) -> dict[str, Any]:
        return {"shard": self.shard, "member": self.member, "offset": self.offset, "size": self.size}


class ShardWriter:
    """Appends members to ``<prefix>/<name>-NNNNN.tar``; the caller flushes when :attr:`full`
    (``max_members`` members or ``max_bytes`` bytes). :meth:`flush` ends a checkpoint: it closes and
    uploads the current shard (if it holds members), returns its refs, and moves on to the next
    index, so checkpoint N always goes with shard N (:attr:`index`)."""

    def __init__(self, prefix: str, name: str, max_members: int = 1000, max_bytes: int = 512 << 20,
                 first_index: int = 0) -> None:  # fmt: skip
        self.prefix, self.name = prefix, name
        self.max_members, self.max_bytes = max(1, max_members), max_bytes
        self.index = first_index
        self._tmp: tempfile._TemporaryFileWrapper | None = None
        self._tar: tarfile.TarFile | None = None
        self._pending: list[tuple[str, int, int]] = []
        self._bytes = 0

    @property
    def shard_uri(self) -> str:
        return join(self.prefix, f"{self.name}-{self.index:05d}.tar")

    @property
    def full(self) -> bool:
        """Whether the current shard reached its size (time to :meth:`flush`)."""
        return len(self._pending) >= self.max_members or self._bytes >= self.max_bytes

    def add(self, member: str, data: bytes) -> MemberRef:
        """Add one member to the current shard; its ref is final once the shard is flushed."""
        if self._tar is None:
            self._tmp = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)  # noqa: SIM115 (closed in flush)
            self._tar = tarfile.open(fileobj=self._tmp, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        info = tarfile.TarInfo(member)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # deterministic bytes
        header = len(info.tobuf(tarfile.USTAR_FORMAT, self._tar.encoding, self._tar.errors))
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))  # addfile copies ``info``: offsets are ours to track
        self._pending.append((member, start + header, len(data)))
        self._bytes += len(data)
        return MemberRef(self.shard_uri, member, start + header, len(data))

    def flush(self) -> list[MemberRef]:
        """Close and upload the current shard (if any member is in it), return its refs, and move on
        to the next index."""
        uri, self.index = self.shard_uri, self.index + 1
        if self._tar is None or self._tmp is None:
            return []
        self._tar.close()
        self._tmp.close()
        try:
            upload_file(self._tmp.name, uri)
        finally:
            Path(self._tmp.name).unlink(missing_ok=True)
        refs = [MemberRef(uri, m, off, size) for m, off, size in self._pending]
        self._tar, self._tmp, self._pending, self._bytes = None, None, [], 0
        return refs


def read_member(ref: MemberRef | dict[str, Any]) -> bytes:
    """The bytes of one member (a range read: the rest of the shard is not touched)."""
    if isinstance(ref, dict):
        ref = MemberRef(str(ref["shard"]), str(ref["member"]), int(ref["offset"]), int(ref["size"]))
    return read_range(ref.shard, ref.offset, ref.size)


def image_bytes(row: dict[str, Any], root: Path | None = None) -> bytes:
    """An image of a manifest row: from its shard ref, or (hand-written manifests) a file path."""
    if row.get("shard"):
        return read_member(row)
    path = Path(str(row.get("image_path") or row.get("path") or ""))
    if not path.is_absolute() and root is not None:
        path = root / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None


def iter_images(
    rows: Iterable[dict[str, Any]], read_ahead: int = 16, workers: int = 4, root: Path | None = None
) -> Iterator[tuple[dict[str, Any], bytes | str]]:
    """``(row, bytes)`` for each row in order, read on ``workers`` threads with at most
    ``read_ahead`` images in memory; an unreadable or truncated member gives ``(row, reason)``
    (naming shard and member) instead of ending the stream."""

    def fetch(row: dict[str, Any]) -> bytes | str:
        try:
            return image_bytes(row, root)
        except Exception as exc:  # storage, network or a bad ref: reported per image
            where = f" {row['shard']}::{row.get('member', '')}" if row.get("shard") else ""
            return f"unreadable{where}: {error_summary(exc, 120)}"

    return ordered_map(fetch, rows, workers, read_ahead)
