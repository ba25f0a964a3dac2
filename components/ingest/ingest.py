"""Ingest: decode-check, measure, hash and deduplicate images; bad files are reported, never fatal.

This module holds the per-image pieces (reading a plan listing, decoding, hashes, the banded
near-duplicate index) and :func:`ingest`, the single-process composition of the data-plane steps:
:mod:`components.plan.plan` (groups) → :mod:`.group` (shards per group) → :mod:`.merge` (global
duplicates). The manifest names each kept image's bytes by ``(shard, member, offset, size)``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import tarfile
import tempfile
import warnings
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import error_summary, first_line
from components.ingest.sidecar import load_sidecar
from components.plan.plan import IMAGE_SUFFIXES, plan_source
from storage import StorageError, download_file, is_s3, read_bytes
from storage.stream import ordered_map

log = logging.getLogger(__name__)
CAPTION_SUFFIXES = (".txt", ".json")
SHARD_SIZE = 1000


@dataclass(frozen=True)
class IngestOptions:
    min_side: int = 32
    max_aspect: float = 4.0
    dedup_distance: int = 4  # perceptual-hash bits; negative: no near-duplicate removal
    max_pixels: int = 50_000_000
    workers: int = 2
    in_flight: int = 64  # files read ahead of the decoder at most (bounds memory)
    shard_size: int = 1000  # images per output shard; each closed shard is a checkpoint
    shard_bytes: int = 512 << 20  # or this many bytes, whichever comes first

    def fingerprint_fields(self) -> dict:
        """The options that change what is kept (they key the plan; workers etc. do not)."""
        keys = ("min_side", "max_aspect", "dedup_distance", "max_pixels", "shard_size", "shard_bytes")
        return {key: getattr(self, key) for key in keys}


@dataclass
class Item:
    """One input file: where it came from, its bytes and any caption found beside it."""

    source: str
    data: bytes
    caption: str | None = None
    error: str | None = None  # set when the file could not even be read


@dataclass
class Decoded:
    source: str
    sha256: str
    phash: int
    color_sig: str
    width: int
    height: int
    format: str
    mode: str
    bytes: int
    caption: str | None
    data: bytes = field(repr=False)


@dataclass
class IngestResult:
    manifest: Path
    rejects: Path
    kept: int
    rejected: int
    dataset_hash: str
    sidecar_unmatched: int = 0  # caption sidecar rows that named no image of the source


def dhash(image: Image.Image, size: int = 8) -> int:
    """64-bit difference hash: brightness gradients of a 9x8 thumbnail."""
    small = np.asarray(image.convert("L").resize((size + 1, size), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def color_signature(image: Image.Image, grid: int = 16, levels: int = 8) -> str:
    """Colour layout (grid x grid mean RGB, quantised to ``levels`` <= 16), two cells' levels per
    byte, as hex. dHash alone ignores colour, so two flat illustrations that differ only in colour
    would look like duplicates; and at 8 x 8 cells (the layout before) two flat shapes of one
    colour at one place ("a blue square" / "a blue circle") agreed too: 16 x 16 cells tell them apart."""
    if not 1 < levels <= 16:
        raise ValueError(f"colour signature levels must be 2..16 (got {levels})")
    small = np.asarray(image.convert("RGB").resize((grid, grid), Image.BOX), dtype=np.int32)
    quantised = (small * levels // 256).astype(np.uint8).flatten()
    if quantised.size % 2:
        quantised = np.append(quantised, np.uint8(0))
    return ((quantised[0::2] << 4) | quantised[1::2]).tobytes().hex()


def signature_levels(sig: bytes) -> np.ndarray:
    """The quantised levels of a packed colour signature (two per byte)."""
    packed = np.frombuffer(sig, dtype=np.uint8)
    return np.stack([packed >> 4, packed & 15], axis=1).flatten().astype(np.int8)


def same_colors(a: bytes, b: bytes, tolerance: int = 1) -> bool:
    """Whether two packed colour signatures agree within ``tolerance`` levels everywhere. Without
    both signatures in one layout (a manifest from before them, or from the 8 x 8 layout) the
    perceptual hash alone decides."""
    if not a or not b or len(a) != len(b):
        return True
    return int(np.abs(signature_levels(a) - signature_levels(b)).max()) <= tolerance


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def decode(item: Item, max_pixels: int) -> Decoded | str:
    """Decode-check one file; returns the measurements or a rejection reason."""
    if not item.data:
        return "zero_bytes"
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(item.data)) as img:
                fmt, frames = img.format or "unknown", getattr(img, "n_frames", 1)
                img.load()
                img = ImageOps.exif_transpose(img)
                mode = img.mode
                rgb = img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "decompression_bomb"
    except UnidentifiedImageError:
        return "not_an_image"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"corrupt: {first_line(exc)[:80]}"
    del frames  # animated images keep their first frame
    return Decoded(
        source=item.source,
        sha256=hashlib.sha256(item.data).hexdigest(),
        phash=dhash(rgb),
        color_sig=color_signature(rgb),
        width=rgb.width,
        height=rgb.height,
        format=fmt.upper(),
        mode=mode,
        bytes=len(item.data),
        caption=item.caption,
        data=item.data,
    )


def iter_tar(
    path: str | Path, skip: Container[str] = frozenset(), label: str | None = None
) -> Iterator[Item]:
    """WebDataset shard: members grouped by key (``key.png`` + ``key.txt`` / ``key.json``). A shard that
    cannot be opened, is truncated or has a member that cannot be read is reported as items with an
    ``error`` naming the shard and member; the readable members still come through."""
    label = label or str(path)
    try:
        tar = tarfile.open(path)  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as exc:
        yield Item(f"{label}::", b"", error=f"unreadable_shard: {first_line(exc)[:80]}")
        return
    with tar:
        members: dict[str, tarfile.TarInfo] = {}
        broken = None
        try:
            for member in tar:
                if member.isfile():
                    members[member.name] = member
        except (tarfile.TarError, OSError, EOFError) as exc:
            broken = f"truncated_shard: {first_line(exc)[:80]} after {len(members)} members"
        for name in sorted(members):
            stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
            if f".{suffix.lower()}" not in IMAGE_SUFFIXES or f"{label}::{name}" in skip:
                continue
            try:
                caption = None
                for ext in CAPTION_SUFFIXES:
                    if f"{stem}{ext}" in members:
                        raw = _member_bytes(tar, members[f"{stem}{ext}"]).decode("utf-8", "replace")
                        caption = _json_caption(raw) if ext == ".json" else raw.strip()
                        break
                data = _member_bytes(tar, members[name])
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield Item(f"{label}::{name}", b"", error=f"unreadable_member: {first_line(exc)[:80]}")
                continue
            yield Item(f"{label}::{name}", data, caption)
        if broken:
            yield Item(f"{label}::", b"", error=broken)


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise EOFError(f"{member.name}: {len(data)} of {member.size} bytes")
    return data


def _json_caption(raw: str) -> str | None:
    """The ``caption`` of a WebDataset ``.json`` sidecar; a broken sidecar gives no caption."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    caption = value.get("caption") if isinstance(value, dict) else None
    return caption.strip() if isinstance(caption, str) else None


def iter_listing(listing: pd.DataFrame, skip: Container[str] = frozenset()) -> Iterator[Item]:
    """The items of a plan listing (images and ``.tar`` shards, local or ``s3://``), read lazily in
    order; sources in ``skip`` (already ingested) are not read. An object that cannot be read is an
    item with an ``error`` (reported, never fatal)."""
    for row in listing.itertuples(index=False):
        if row.kind == "tar":
            yield from _iter_tar_uri(row.uri, skip)
            continue
        if row.uri in skip:
            continue
        try:
            caption = (
                read_bytes(row.caption_uri).decode("utf-8", "replace").strip() or None
                if row.caption_uri
                else None
            )
            data = read_bytes(row.uri)
        except StorageError as exc:
            yield Item(row.uri, b"", error=f"unreadable: {first_line(exc)[:120]}")
            continue
        yield Item(row.uri, data, caption)


def _iter_tar_uri(uri: str, skip: Container[str]) -> Iterator[Item]:
    """A source shard: local ones are read in place; an ``s3://`` one is downloaded to a temporary
    file first (one shard on disk at a time)."""
    if not is_s3(uri):
        yield from iter_tar(uri, skip)
        return
    with tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        try:
            local = download_file(uri, Path(tmp) / "shard.tar")
        except StorageError as exc:
            yield Item(f"{uri}::", b"", error=f"unreadable_shard: {first_line(exc)[:120]}")
            return
        yield from iter_tar(local, skip, label=uri)


def _filter(d: Decoded, opts: IngestOptions) -> str | None:
    if min(d.width, d.height) < opts.min_side:
        return f"too_small: {d.width}x{d.height} < {opts.min_side}"
    if max(d.width, d.height) / min(d.width, d.height) > opts.max_aspect:
        return f"bad_aspect: {d.width}x{d.height}"
    return None


def _check(item: Item, max_pixels: int) -> Decoded | str:
    """Decode one item; whatever a malformed file makes a decoder raise is a rejection, never fatal."""
    if item.error:
        return item.error
    try:
        return decode(item, max_pixels)
    except Exception as exc:  # image plugins raise struct.error, IndexError, ... on fuzzed input
        return f"decode_error: {error_summary(exc, 80)}"


def decode_stream(items: Iterable[Item], opts: IngestOptions) -> Iterator[tuple[Item, Decoded | str]]:
    """Decode ``items`` on ``opts.workers`` threads, in order, with at most ``opts.in_flight`` files
    read ahead (memory stays bounded whatever the size of the source)."""
    return ordered_map(lambda item: _check(item, opts.max_pixels), items, opts.workers, opts.in_flight)


class NearDuplicateIndex:
    """Perceptual hashes banded for lookup: two 64-bit hashes within ``distance`` bits agree
    exactly on at least one of ``distance + 1`` bands (pigeonhole), so a query only compares the
    hashes that share a band with it instead of every hash seen so far."""

    def __init__(self, distance: int) -> None:
        """``distance < 0`` turns near-duplicate detection off (``find`` always gives None)."""
        self.distance = distance
        n = min(max(distance + 1, 0), 64)
        edges = [round(i * 64 / n) for i in range(n + 1)] if n else []
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._entries: list[tuple[int, bytes, str]] = []

    def add(self, phash: int, color_sig: str, image_id: str) -> None:
        """Remember a kept image (``color_sig``: :func:`color_signature`'s hex, held as bytes)."""
        index = len(self._entries)
        self._entries.append((phash, bytes.fromhex(color_sig), image_id))
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            table.setdefault((phash >> shift) & mask, []).append(index)

    def find(self, phash: int, color_sig: str) -> str | None:
        """The id of the first added image within ``distance`` bits and a matching colour layout."""
        candidates: set[int] = set()
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            candidates.update(table.get((phash >> shift) & mask, ()))
        sig = bytes.fromhex(color_sig)
        for index in sorted(candidates):
            other, other_sig, image_id = self._entries[index]
            if hamming(other, phash) <= self.distance and same_colors(other_sig, sig):
                return image_id
        return None


def ingest(
    source: str | Path,
    out_dir: str | Path,
    options: IngestOptions | None = None,
    captions: str | Path | None = None,
    *,
    group_size: int = 5000,
    progress: bool = True,
) -> IngestResult:
    """The whole data-plane ingest in one process: plan ``source`` into groups, ingest each group
    (shards under ``out_dir/ingest-<fingerprint>/``) and merge them into ``out_dir/manifest.parquet``,
    ``rejects.csv`` and ``dataset.json``. The pipeline runs the same three functions as separate,
    fanned-out tasks. A rerun resumes: finished shards are kept and their sources not read again."""
    from components.ingest.group import ingest_group
    from components.ingest.merge import merge_groups

    opts = options or IngestOptions()
    out = Path(out_dir)
    sidecar = load_sidecar(captions) if captions else None  # a bad sidecar fails before anything is written
    plan = plan_source(str(source), str(out), group_size=group_size, options=opts.fingerprint_fields())
    folders = []
    for group in plan.groups:
        folder = out / "groups" / group.name
        ingest_group(group, folder, opts, progress=progress)
        folders.append(folder)
    return merge_groups(folders, plan.groups, out, opts, captions=sidecar, source_root=str(source))


_INT_COLUMNS = {"width", "height", "bytes", "seq", "offset", "size"}
MANIFEST_COLUMNS = [
    "id",
    "source_path",
    "sha256",
    "phash",
    "color_sig",
    "width",
    "height",
    "format",
    "mode",
    "bytes",
    "caption",
    "group",
    "seq",
    "shard",
    "member",
    "offset",
    "size",
]

# The merged manifest's Parquet schema (it is written group by group, so the types are fixed here:
# a group whose captions are all missing must not make the column a null type).
MANIFEST_SCHEMA = pa.schema(
    [
        (name, pa.uint64() if name == "phash" else pa.int64() if name in _INT_COLUMNS else pa.string())
        for name in MANIFEST_COLUMNS
    ]
)
