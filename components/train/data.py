"""Training data: the tier manifest, aspect-ratio buckets, caption sampling and the
latent / text-embedding cache (so training steps run no VAE and no Gemma).

Training manifest (Parquet, one row per image; written by the tier step): ``id`` (str),
``domain`` (``real`` | ``synthetic``), ``captions`` (JSON list of
``{"granularity", "language", "text"}``) and where the image is: either a shard ref
(``shard``, ``member``, ``offset``, ``size``: a member of a WebDataset-style tar, see
:mod:`storage.shards`) or ``image_path`` (absolute or relative to the image root / the manifest's
folder; hand-written manifests). Optional ``width`` / ``height`` (the EXIF-transposed size, as
ingest measured it) put an image in its bucket without reading it.

Image bytes are always read through :func:`storage.shards.image_bytes` (a range read for a shard
member, local or ``s3://``). With a latent index (:mod:`components.latents`) the stage's latents
are served lazily from the safetensors files it names instead of being encoded here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from common.errors import ConfigError
from components.recaption.schema import is_training_caption
from model.prompts import GRID_DOMAIN, SystemPrompt, apply_grid_fills, apply_system_prompt, domain_template
from storage.io import is_s3
from storage.shards import REF_COLUMNS, MemberRef, image_bytes

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "image_path", "domain", "captions")
ASPECT_RATIOS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)
SIDE_MULTIPLE = 64  # VAE x8, patch x2, aux pool x4


@dataclass(frozen=True)
class Caption:
    granularity: str
    language: str
    text: str


def parse_captions(text: str) -> tuple[Caption, ...]:
    """A manifest's (or latent index's) ``captions`` cell: a JSON list of granularity/language/text."""
    return tuple(Caption(**c) for c in json.loads(text))


@dataclass(frozen=True)
class TrainRecord:
    """One training image: a file (``image_path``) or a shard member (``ref``), its captions and,
    when the manifest has them, its (EXIF-transposed) ``width`` / ``height``."""

    id: str
    image_path: Path | None
    domain: str
    captions: tuple[Caption, ...]
    ref: MemberRef | None = None  # the shard member holding the image
    width: int | None = None
    height: int | None = None
    grid_fill: str | None = None  # a grid row's Template C fill-ins per language (JSON; grids step)

    def source_row(self) -> dict[str, Any]:
        """The row :func:`storage.shards.image_bytes` reads this image from."""
        row: dict[str, Any] = {"image_path": str(self.image_path) if self.image_path else None}
        if self.ref is not None:
            row.update(self.ref.as_row())
        return row

    @property
    def where(self) -> str:
        """The image's location, for messages."""
        if self.ref is not None:
            return f"{self.ref.shard}::{self.ref.member}"
        return str(self.image_path)


def stage_manifest(path: str | Path, stage: str) -> Path:
    """A tier folder (``lowres.parquet``, ``highres.parquet``, ``hq.parquet``) → the stage's file."""
    path = Path(path)
    return path / f"{stage}.parquet" if path.is_dir() else path


def _present(value: Any) -> bool:
    """A manifest cell that holds a value (not None / NaN / empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def read_manifest(path: str | Path, image_root: str | Path | None = None) -> list[TrainRecord]:
    """Read and check a whole training manifest (see :func:`iter_manifest`)."""
    records = [r for chunk in iter_manifest(path, image_root) for r in chunk]
    if not records:
        raise ConfigError(f"training manifest {path} is empty")
    return records


def iter_manifest(
    path: str | Path, image_root: str | Path | None = None, batch_rows: int = 4096
) -> Iterator[list[TrainRecord]]:
    """Read and check a training manifest ``batch_rows`` rows at a time (memory bounded by the
    batch); one clear error for a bad one. Rows name their image by a shard ref or by
    ``image_path``; relative image paths (and relative local shard paths) resolve against
    ``image_root`` (e.g. the ingest dataset) or else the manifest's folder."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise ConfigError(f"training manifest not found: {path}")
    try:
        table = pq.ParquetFile(path)
        columns = set(table.schema_arrow.names)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise ConfigError(f"cannot read training manifest {path}: {str(exc).splitlines()[0]}") from None
    has_refs = "shard" in columns
    missing = [c for c in REQUIRED_COLUMNS if c not in columns and not (c == "image_path" and has_refs)]
    if has_refs:
        missing += [c for c in REF_COLUMNS if c not in columns]
    if missing:
        raise ConfigError(f"training manifest {path} lacks columns: {', '.join(missing)}")
    has_paths, has_size = "image_path" in columns, {"width", "height"} <= columns
    for batch in table.iter_batches(batch_size=batch_rows):
        records = []
        for row in batch.to_pylist():
            records.append(_manifest_record(row, path, root, has_refs, has_paths, has_size))
        yield records


def _manifest_record(
    row: dict[str, Any], path: Path, root: Path, has_refs: bool, has_paths: bool, has_size: bool
) -> TrainRecord:
    rid = str(row["id"])
    caps = parse_captions(row["captions"])
    if not caps:
        raise ConfigError(f"training manifest {path}: image {rid} has no captions")
    ref = image = None
    if has_refs and _present(row["shard"]):
        shard = str(row["shard"])
        if not is_s3(shard) and not Path(shard).is_absolute():
            shard = str(root / shard)
        if not (_present(row["offset"]) and _present(row["size"])):
            raise ConfigError(f"training manifest {path}: image {rid} has a shard but no offset/size")
        ref = MemberRef(shard, str(row["member"]), int(row["offset"]), int(row["size"]))
    elif has_paths and _present(row["image_path"]):
        image = Path(str(row["image_path"]))
        image = image if image.is_absolute() else root / image
    else:
        raise ConfigError(f"training manifest {path}: image {rid} has neither a shard nor an image_path")
    width = height = None
    if has_size and _present(row["width"]) and _present(row["height"]):
        width, height = int(row["width"]), int(row["height"])
    fill = row.get("grid_fill")
    return TrainRecord(rid, image, str(row["domain"]), caps, ref, width, height,
                       str(fill) if _present(fill) else None)  # fmt: skip


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets with area <= resolution² and sides multiple of 64."""
    sizes = []
    for ar in ASPECT_RATIOS:  # ar = width / height
        h = int(resolution / math.sqrt(ar)) // SIDE_MULTIPLE * SIDE_MULTIPLE
        w = int(resolution * math.sqrt(ar)) // SIDE_MULTIPLE * SIDE_MULTIPLE
        if h >= SIDE_MULTIPLE and w >= SIDE_MULTIPLE and (h, w) not in sizes:
            sizes.append((h, w))
    return sizes


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ar))


def read_image_bytes(source: TrainRecord | Path | str | bytes) -> bytes:
    """The encoded bytes of an image given as a record (shard ref or file), a file path or bytes."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, TrainRecord):
        return image_bytes(source.source_row())
    return image_bytes({"image_path": str(source)})


def decode_image(source: TrainRecord | Path | str | bytes) -> Image.Image:
    """Decoded, EXIF-transposed RGB image."""
    with Image.open(io.BytesIO(read_image_bytes(source))) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations exif_transpose rotates by 90°


def measure_image(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF transpose, from the header alone (no pixels decoded)."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    return (h, w) if orientation in _SWAPS_SIDES else (w, h)


def image_size(record: TrainRecord) -> tuple[int, int]:
    """(width, height) after EXIF transpose: from the manifest when it has them, else measured."""
    if record.width and record.height:
        return record.width, record.height
    return measure_image(read_image_bytes(record))


def load_image(source: TrainRecord | Path | str | bytes, size: tuple[int, int]) -> torch.Tensor:
    """Decode, EXIF-transpose, resize to cover and centre-crop to (h, w); values in [-1, 1].
    ``source``: a record (read from its shard or file), a file path, or the image's bytes."""
    h, w = size
    img = decode_image(source)
    scale = max(w / img.width, h / img.height)
    resized = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    arr = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


FINGERPRINT_SAMPLE = 1 << 16  # elements hashed per tensor at most (a fixed stride over larger ones)


def fingerprint(module: torch.nn.Module) -> str:
    """Content hash of a module's config and weights (keys the latent and text caches): the same
    in every process, whatever the thread count, and after a save / load round trip. Exact bytes
    are hashed (a float sum is not reproducible across thread counts); a large tensor contributes
    its shape, dtype and a fixed-stride sample of its elements, so a 2.6B model hashes in seconds."""
    raw = getattr(module, "config", None) or {}
    settings = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)  # transformers or diffusers
    config = {k: v for k, v in settings.items() if not str(k).startswith("_")}  # _name_or_path, versions
    digest = hashlib.sha256(json.dumps(config, default=str, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLE:
            flat = flat[:: flat.numel() // FINGERPRINT_SAMPLE]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def training_captions(record: TrainRecord) -> list[Caption]:
    """The captions a record can be trained with: all but empty ones and an ``ocr`` perspective of
    ``none`` (the captioner's "no visible text" answer, which says nothing to draw)."""
    return [c for c in record.captions if is_training_caption(c.granularity, c.text)]


def prompt_texts(
    record: TrainRecord, captions: Sequence[Caption], system_prompts: dict[str, SystemPrompt] | None = None
) -> list[str]:
    """``captions`` of ``record`` as training texts: a grid row (domain ``grid`` with ``grid_fill``)
    gets Template C with its fill-ins for each caption's language (the English ones for a language
    without its own); any other row its domain's system prompt (:func:`model.prompts.domain_template`)."""
    if record.domain == GRID_DOMAIN and record.grid_fill:
        try:
            fill = json.loads(record.grid_fill)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"image {record.id}: grid_fill is not valid JSON ({exc.msg})") from None
        if not isinstance(fill, dict) or "en" not in fill:
            raise ConfigError(f"image {record.id}: grid_fill needs the English fill-ins (an 'en' entry)")
        return [apply_grid_fills(c.text, fill, c.language) for c in captions]
    template = domain_template(record.domain, system_prompts)
    return [apply_system_prompt(c.text, template) for c in captions]


def caption_texts(record: TrainRecord, system_prompts: dict[str, SystemPrompt]) -> list[str]:
    """All text variants a record can be trained with (system prompt per domain, Template C for grids)."""
    return prompt_texts(record, training_captions(record), system_prompts)


def choose_caption(
    record: TrainRecord,
    rng: random.Random,
    granularity_weights: dict[str, float],
    language_weights: dict[str, float],
    system_prompts: dict[str, SystemPrompt],
) -> str:
    """Pick one caption variant, weighted by caption kind (the ``granularity`` entry: one of the four
    lengths or a UniCap perspective; a kind without a weight weighs 1) times language. Only
    :func:`training_captions` are candidates; when every weight is 0 they are drawn uniformly, and a
    record without any trains unconditionally (``""``)."""
    captions = training_captions(record)
    if not captions:
        return ""
    texts = prompt_texts(record, captions, system_prompts)
    weights = [
        granularity_weights.get(c.granularity, 1.0) * language_weights.get(c.language, 1.0) for c in captions
    ]
    if sum(weights) <= 0:
        weights = [1.0] * len(texts)
    return rng.choices(texts, weights=weights, k=1)[0]


def pad_features(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption features of valid tokens only, ``(L_i, D)`` each, as one right-padded batch and mask."""
    length = max(f.shape[0] for f in feats)
    embeds = torch.zeros(len(feats), length, feats[0].shape[1])
    mask = torch.zeros(len(feats), length, dtype=torch.long)
    for i, f in enumerate(feats):
        embeds[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1
    return embeds, mask
