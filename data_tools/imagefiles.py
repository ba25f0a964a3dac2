"""Writing sample-data image folders: RGB loading and downscaling, metadata-free deterministic
encoding, atomic writes that leave unchanged files alone, the JSON-lines record files, and the
seeded pick of which source images a folder holds."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageCms, ImageOps

from common.errors import ConfigError, LuminaError

logger = logging.getLogger(__name__)

PHOTO_MAX_SIDE = 768
PHOTO_QUALITY = 90
WHITE = (255, 255, 255)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_if_changed(path: Path, data: bytes) -> None:
    """Write only when the content differs, so a rebuild leaves finished files untouched."""
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*WHITE, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert from an embedded non-sRGB ICC profile; pixels are kept when that fails."""
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower().replace(" ", ""):
            return image
        return ImageCms.profileToProfile(image.convert("RGB"), profile, ImageCms.createProfile("sRGB"))
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def load_rgb(path: Path, max_side: int, *, photo: bool) -> Image.Image:
    """Open ``path`` as an RGB image (on white) whose long side is at most ``max_side``."""
    try:
        with Image.open(path) as src:
            if photo and src.format == "JPEG":
                # DCT-domain downscaling to at least twice the target: faster, still sharp.
                scale = 2 * max_side / max(src.size)
                if scale < 1:
                    src.draft("RGB", (math.ceil(src.width * scale), math.ceil(src.height * scale)))
            image = src.copy() if not photo else _to_srgb(ImageOps.exif_transpose(src))
            image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise LuminaError(f"cannot read image {path}: {exc}") from exc
    return _downscale(_flatten(image), max_side)


def encode(image: Image.Image, fmt: str) -> bytes:
    """Encoded bytes with no metadata (the same pixels always give the same bytes)."""
    image = image.copy()
    image.info = {}
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=PHOTO_QUALITY)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


SOURCE_KEYS = ("package", "version", "original_path", "render_version")


def is_current(
    previous: dict | None, record: dict, files: Iterable[Path], keys: Sequence[str] = SOURCE_KEYS
) -> bool:
    """Whether the files of ``record`` were built from the same source by the same renderer (its
    ``keys`` equal in the ``previous`` record) and are all still there: a rebuild can skip them."""
    return (previous is not None and all(previous.get(k) == record.get(k) for k in keys)
            and all(f.is_file() for f in files))  # fmt: skip


def read_records(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            records[record["file"]] = record
        except (ValueError, KeyError, TypeError):
            continue
    return records


def remove_stale(out: Path, pattern: str, keep: set[str]) -> None:
    regex = re.compile(pattern)
    for path in out.iterdir():
        if regex.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def pick_sample(items: list, limit: int, seed: int, what: str) -> list:
    """``limit`` of ``items`` picked at random with ``seed`` (all of them, with a warning, when fewer)."""
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    if limit > len(items):
        logger.warning("%s: only %d available, taking all (limit %d)", what, len(items), limit)
    return random.Random(seed).sample(items, min(limit, len(items)))
