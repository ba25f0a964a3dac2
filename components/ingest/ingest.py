"""Ingest: decode-check, measure, hash and deduplicate images; bad files are reported, never fatal.

Outputs in ``out_dir``: ``manifest.parquet`` (one row per kept image, stable id = sha256 prefix),
``images/<shard>/<id>.<ext>`` (the original bytes), ``rejects.csv`` (source, reason) and
``dataset.json`` (the dataset hash over ids and content hashes).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from model.errors import ConfigError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIXES = (".txt", ".json")
SHARD_SIZE = 1000


@dataclass(frozen=True)
class IngestOptions:
    min_side: int = 32
    max_aspect: float = 4.0
    dedup_distance: int = 4
    max_pixels: int = 50_000_000
    workers: int = 2


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
        return f"corrupt: {str(exc).splitlines()[0][:80]}"
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


def iter_folder(root: Path) -> Iterator[Item]:
    """Every file under ``root`` (sorted) that looks like an image; a caption .txt beside it is kept."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield Item(str(path), b"", error=f"unreadable: {exc.strerror}")
            continue
        yield Item(str(path), data, caption)


def iter_tar(path: Path) -> Iterator[Item]:
    """WebDataset shard: members grouped by key (``key.png`` + ``key.txt`` / ``key.json``)."""
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name in sorted(members):
            stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
            if f".{suffix.lower()}" not in IMAGE_SUFFIXES:
                continue
            caption = None
            for ext in CAPTION_SUFFIXES:
                if f"{stem}{ext}" in members:
                    raw = tar.extractfile(members[f"{stem}{ext}"]).read().decode("utf-8", "replace")
                    caption = json.loads(raw).get("caption") if ext == ".json" else raw.strip()
                    break
            yield Item(f"{path}::{name}", tar.extractfile(members[name]).read(), caption)


def iter_s3(uri: str) -> Iterator[Item]:
    """Objects under ``s3://bucket/prefix`` (paginated; endpoint from ``AWS_ENDPOINT_URL``)."""
    from services.s3 import s3_client

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    present = set(keys)
    for key in sorted(keys):
        if Path(key).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_key = str(Path(key).with_suffix(".txt"))
        caption = None
        if caption_key in present:
            caption = (
                client.get_object(Bucket=bucket, Key=caption_key)["Body"].read().decode("utf-8", "replace")
            )
        try:
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore raises many client/transport errors
            yield Item(f"s3://{bucket}/{key}", b"", error=f"unreadable: {type(exc).__name__}")
            continue
        yield Item(f"s3://{bucket}/{key}", data, caption.strip() if caption else None)


def iter_source(source: str | Path) -> Iterator[Item]:
    if str(source).startswith("s3://"):
        yield from iter_s3(str(source))
        return
    path = Path(source)
    if path.is_dir():
        yield from iter_folder(path)
        for shard in sorted(path.rglob("*.tar")):
            yield from iter_tar(shard)
    elif path.is_file() and path.suffix == ".tar":
        yield from iter_tar(path)
    else:
        raise ConfigError(f"ingest source not found or not a folder / .tar shard / s3:// prefix: {source}")


def _filter(d: Decoded, opts: IngestOptions) -> str | None:
    if min(d.width, d.height) < opts.min_side:
        return f"too_small: {d.width}x{d.height} < {opts.min_side}"
    if max(d.width, d.height) / min(d.width, d.height) > opts.max_aspect:
        return f"bad_aspect: {d.width}x{d.height}"
    return None


def ingest(source: str | Path, out_dir: str | Path, options: IngestOptions | None = None) -> IngestResult:
    """Ingest ``source`` into ``out_dir``; rerunning skips images already in the manifest."""
    opts = options or IngestOptions()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest_path, rejects_path = out / "manifest.parquet", out / "rejects.csv"
    previous = pd.read_parquet(manifest_path) if manifest_path.is_file() else pd.DataFrame()
    kept: list[dict] = previous.to_dict("records") if len(previous) else []
    known = {row["sha256"]: row["id"] for row in kept}
    hashes = [(row["phash"], row.get("color_sig") or "", row["id"]) for row in kept]
    rejects: list[tuple[str, str]] = []

    items = list(iter_source(source))
    with ThreadPoolExecutor(max(1, opts.workers)) as pool:
        results = pool.map(
            lambda it: decode(it, opts.max_pixels) if it.data else it.caption or "zero_bytes", items
        )
        for item, res in tqdm(zip(items, results, strict=True), total=len(items), desc="ingest", leave=False):
            if isinstance(res, str):
                rejects.append((item.source, res))
                continue
            if res.sha256 in known:
                if not any(r["source_path"] == item.source for r in kept):
                    rejects.append((item.source, f"duplicate_of:{known[res.sha256]}"))
                continue
            reason = _filter(res, opts)
            near = next(
                (
                    i
                    for h, c, i in hashes
                    if hamming(h, res.phash) <= opts.dedup_distance and same_colors(c, res.color_sig)
                ),
                None,
            )
            if reason is None and near is not None:
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
            hashes.append((res.phash, res.color_sig, image_id))

    frame = pd.DataFrame(kept, columns=_COLUMNS)
    frame["phash"] = frame["phash"].astype("uint64")
    frame.to_parquet(manifest_path, index=False)
    with open(rejects_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "reason"])
        writer.writerows(rejects)
    digest = hashlib.sha256(
        "".join(f"{i}:{s}\n" for i, s in sorted(zip(frame["id"], frame["sha256"], strict=True))).encode()
    )
    result = IngestResult(manifest_path, rejects_path, len(frame), len(rejects), digest.hexdigest())
    (out / "dataset.json").write_text(json.dumps({"dataset_hash": result.dataset_hash, "kept": result.kept}))
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
