"""Ingest: decode-check, measure, hash and deduplicate images; bad files are reported, never fatal.

Outputs in ``out_dir``: ``manifest.parquet`` (one row per kept image, stable id = sha256 prefix),
``images/<shard>/<id>.<ext>`` (the original bytes), ``rejects.csv`` (source, reason) and
``dataset.json`` (the dataset hash over ids and content hashes).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import tarfile
import warnings
from collections import deque
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from components.ingest.sidecar import CaptionSidecar, load_sidecar, relative_source
from model.errors import ConfigError, error_summary, first_line

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
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
    checkpoint_every: int = 500  # kept images between manifest saves (what an interruption keeps)


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


def color_signature(image: Image.Image, grid: int = 8, levels: int = 8) -> str:
    """Coarse colour layout (grid x grid mean RGB, quantised): dHash alone ignores colour, so two
    flat illustrations that differ only in colour would look like duplicates."""
    small = np.asarray(image.convert("RGB").resize((grid, grid), Image.BOX), dtype=np.int32)
    return bytes((small * levels // 256).astype(np.uint8).flatten()).hex()


def same_colors(a: str, b: str, tolerance: int = 1) -> bool:
    """Whether two colour signatures agree within ``tolerance`` quantisation levels everywhere."""
    if not a or not b:
        return True  # a manifest from before colour signatures: fall back to the hash alone
    return max(abs(x - y) for x, y in zip(bytes.fromhex(a), bytes.fromhex(b), strict=True)) <= tolerance


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


def iter_folder(root: Path, skip: Container[str] = frozenset()) -> Iterator[Item]:
    """Every file under ``root`` (sorted) that looks like an image; a caption .txt beside it is kept.
    Files are read one at a time as the iterator is consumed; sources in ``skip`` are not read."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or str(path) in skip:
            continue
        txt = path.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
            data = path.read_bytes()
        except OSError as exc:
            yield Item(str(path), b"", error=f"unreadable: {exc.strerror}")
            continue
        yield Item(str(path), data, caption)


def iter_tar(path: Path, skip: Container[str] = frozenset()) -> Iterator[Item]:
    """WebDataset shard: members grouped by key (``key.png`` + ``key.txt`` / ``key.json``)."""
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name in sorted(members):
            stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
            if f".{suffix.lower()}" not in IMAGE_SUFFIXES or f"{path}::{name}" in skip:
                continue
            caption = None
            for ext in CAPTION_SUFFIXES:
                if f"{stem}{ext}" in members:
                    raw = tar.extractfile(members[f"{stem}{ext}"]).read().decode("utf-8", "replace")
                    caption = _json_caption(raw) if ext == ".json" else raw.strip()
                    break
            yield Item(f"{path}::{name}", tar.extractfile(members[name]).read(), caption)


def _json_caption(raw: str) -> str | None:
    """The ``caption`` of a WebDataset ``.json`` sidecar; a broken sidecar gives no caption."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    caption = value.get("caption") if isinstance(value, dict) else None
    return caption.strip() if isinstance(caption, str) else None


def iter_s3(uri: str, skip: Container[str] = frozenset()) -> Iterator[Item]:
    """Objects under ``s3://bucket/prefix`` (paginated; endpoint from ``AWS_ENDPOINT_URL``)."""
    from services.s3 import s3_client

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    present = set(keys)
    for key in sorted(keys):
        source = f"s3://{bucket}/{key}"
        if Path(key).suffix.lower() not in IMAGE_SUFFIXES or source in skip:
            continue
        caption_key = str(Path(key).with_suffix(".txt"))
        try:
            caption = None
            if caption_key in present:
                body = client.get_object(Bucket=bucket, Key=caption_key)["Body"].read()
                caption = body.decode("utf-8", "replace").strip() or None
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore raises many client/transport errors
            yield Item(source, b"", error=f"unreadable: {type(exc).__name__}")
            continue
        yield Item(source, data, caption)


def iter_source(source: str | Path, skip: Container[str] = frozenset()) -> Iterator[Item]:
    """The items of a folder (plus the ``.tar`` shards under it), a ``.tar`` shard or an ``s3://``
    prefix, read lazily; sources named in ``skip`` (already ingested) are not read. A source that
    does not exist raises :class:`ConfigError` here, before anything is read."""
    if str(source).startswith("s3://"):
        return iter_s3(str(source), skip)
    path = Path(source)
    if path.is_dir():
        shards = (iter_tar(shard, skip) for shard in sorted(path.rglob("*.tar")))
        return itertools.chain(iter_folder(path, skip), itertools.chain.from_iterable(shards))
    if path.is_file() and path.suffix == ".tar":
        return iter_tar(path, skip)
    raise ConfigError(f"ingest source not found or not a folder / .tar shard / s3:// prefix: {source}")


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
    window = max(1, opts.in_flight)
    with ThreadPoolExecutor(max(1, opts.workers)) as pool:
        pending: deque[tuple[Item, Future]] = deque()
        for item in items:
            pending.append((item, pool.submit(_check, item, opts.max_pixels)))
            if len(pending) >= window:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


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
        self._entries: list[tuple[int, str, str]] = []

    def add(self, phash: int, color_sig: str, image_id: str) -> None:
        index = len(self._entries)
        self._entries.append((phash, color_sig, image_id))
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            table.setdefault((phash >> shift) & mask, []).append(index)

    def find(self, phash: int, color_sig: str) -> str | None:
        """The id of the first added image within ``distance`` bits and a matching colour layout."""
        candidates: set[int] = set()
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            candidates.update(table.get((phash >> shift) & mask, ()))
        for index in sorted(candidates):
            other, other_sig, image_id = self._entries[index]
            if hamming(other, phash) <= self.distance and same_colors(other_sig, color_sig):
                return image_id
        return None


def _write_manifest(kept: list[dict], path: Path) -> pd.DataFrame:
    """Write the manifest atomically (a crash mid-write leaves the previous one)."""
    frame = pd.DataFrame(kept, columns=_COLUMNS)
    frame["phash"] = frame["phash"].astype("uint64")
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    return frame


def _with_sidecar(items: Iterable[Item], sidecar: CaptionSidecar, source: str | Path) -> Iterator[Item]:
    for item in items:
        caption = sidecar.lookup(relative_source(source, item.source))
        yield replace(item, caption=caption) if caption is not None else item


def ingest(
    source: str | Path,
    out_dir: str | Path,
    options: IngestOptions | None = None,
    captions: str | Path | None = None,
) -> IngestResult:
    """Ingest ``source`` into ``out_dir``, streaming: files are read as they are decoded, and the
    manifest is saved every ``options.checkpoint_every`` kept images, so an interrupted run keeps its
    work and a rerun skips the sources already in the manifest without reading them again.
    ``captions``: an optional caption sidecar table (see :mod:`components.ingest.sidecar`)."""
    opts = options or IngestOptions()
    out = Path(out_dir)
    sidecar = load_sidecar(captions) if captions else None
    manifest_path, rejects_path = out / "manifest.parquet", out / "rejects.csv"
    previous = pd.read_parquet(manifest_path) if manifest_path.is_file() else pd.DataFrame()
    kept: list[dict] = previous.to_dict("records") if len(previous) else []
    known = {row["sha256"]: row["id"] for row in kept}
    items = iter_source(source, skip={row["source_path"] for row in kept})  # a bad source fails here
    if sidecar is not None:
        for row in kept:  # images kept by an earlier run take the sidecar's caption too
            caption = sidecar.lookup(relative_source(source, row["source_path"]))
            row["caption"] = caption if caption is not None else row.get("caption")
        items = _with_sidecar(items, sidecar, source)
    (out / "images").mkdir(parents=True, exist_ok=True)
    near_index = NearDuplicateIndex(opts.dedup_distance)
    for row in kept:
        near_index.add(int(row["phash"]), row.get("color_sig") or "", row["id"])
    rejects: list[tuple[str, str]] = []
    unsaved = 0
    for item, res in tqdm(decode_stream(items, opts), desc="ingest", unit="img", leave=False):
        if isinstance(res, str):
            rejects.append((item.source, res))
            continue
        if res.sha256 in known:
            rejects.append((item.source, f"duplicate_of:{known[res.sha256]}"))
            continue
        reason = _filter(res, opts)
        if reason is None and (near := near_index.find(res.phash, res.color_sig)) is not None:
            reason = f"near_duplicate_of:{near}"
        if reason:
            rejects.append((item.source, reason))
            continue
        image_id = res.sha256[:16]
        shard = out / "images" / f"{len(kept) // SHARD_SIZE:05d}"
        shard.mkdir(exist_ok=True)
        ext = {"JPEG": "jpg"}.get(res.format, res.format.lower())
        (shard / f"{image_id}.{ext}").write_bytes(res.data)
        row = {k: v for k, v in asdict(res).items() if k not in ("data", "source")}
        row.update(
            id=image_id, source_path=item.source, path=str((shard / f"{image_id}.{ext}").relative_to(out))
        )
        row["phash"] = int(res.phash)
        kept.append(row)
        known[res.sha256] = image_id
        near_index.add(res.phash, res.color_sig, image_id)
        unsaved += 1
        if unsaved >= opts.checkpoint_every:
            _write_manifest(kept, manifest_path)
            unsaved = 0

    frame = _write_manifest(kept, manifest_path)
    with open(rejects_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "reason"])
        writer.writerows(rejects)
    digest = hashlib.sha256(
        "".join(f"{i}:{s}\n" for i, s in sorted(zip(frame["id"], frame["sha256"], strict=True))).encode()
    )
    unmatched = sidecar.unmatched if sidecar else 0
    result = IngestResult(
        manifest_path, rejects_path, len(frame), len(rejects), digest.hexdigest(), unmatched
    )
    summary = {"dataset_hash": result.dataset_hash, "kept": result.kept}
    if sidecar is not None:
        summary.update(sidecar=str(sidecar.path), sidecar_unmatched=unmatched)
        if unmatched:
            log.warning(
                "caption sidecar: %d of %d rows matched no ingested image", unmatched, len(sidecar.captions)
            )
    (out / "dataset.json").write_text(json.dumps(summary))
    log.info(
        "ingest: kept %d, rejected %d, dataset %s", result.kept, result.rejected, result.dataset_hash[:12]
    )
    return result


_COLUMNS = [
    "id",
    "path",
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
]
