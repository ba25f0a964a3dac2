"""Training data: the tier manifest, aspect-ratio buckets, caption sampling and the
latent / text-embedding cache (so training steps run no VAE and no Gemma).

Training manifest (Parquet, one row per image; written by the tier step):
``id`` (str), ``image_path`` (str, absolute or relative to the manifest), ``domain``
(``real`` | ``synthetic``), ``captions`` (JSON list of ``{"granularity", "language", "text"}``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from model.errors import ConfigError
from model.prompts import SystemPrompt, apply_system_prompt
from model.text import encode_prompts
from model.vae import encode_pixels

REQUIRED_COLUMNS = ("id", "image_path", "domain", "captions")
ASPECT_RATIOS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)
SIDE_MULTIPLE = 64  # VAE x8, patch x2, aux pool x4


@dataclass(frozen=True)
class Caption:
    granularity: str
    language: str
    text: str


@dataclass(frozen=True)
class TrainRecord:
    id: str
    image_path: Path
    domain: str
    captions: tuple[Caption, ...]


def stage_manifest(path: str | Path, stage: str) -> Path:
    """A tier folder (``lowres.parquet``, ``highres.parquet``, ``hq.parquet``) → the stage's file."""
    path = Path(path)
    return path / f"{stage}.parquet" if path.is_dir() else path


def read_manifest(path: str | Path, image_root: str | Path | None = None) -> list[TrainRecord]:
    """Read and check a training manifest; one clear error for a bad one. Relative image paths
    resolve against ``image_root`` (e.g. the ingest dataset) or else the manifest's folder."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise ConfigError(f"training manifest not found: {path}")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise ConfigError(f"cannot read training manifest {path}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"training manifest {path} lacks columns: {', '.join(missing)}")
    records = []
    for row in frame.itertuples(index=False):
        caps = tuple(Caption(**c) for c in json.loads(row.captions))
        if not caps:
            raise ConfigError(f"training manifest {path}: image {row.id} has no captions")
        image = Path(row.image_path)
        records.append(
            TrainRecord(str(row.id), image if image.is_absolute() else root / image, row.domain, caps)
        )
    if not records:
        raise ConfigError(f"training manifest {path} is empty")
    return records


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


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Decode, EXIF-transpose, resize to cover and centre-crop to (h, w); values in [-1, 1]."""
    h, w = size
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        scale = max(w / img.width, h / img.height)
        resized = img.resize(
            (max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC
        )
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    arr = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def fingerprint(module: torch.nn.Module) -> str:
    """Cheap content hash of a module's config and weights (keys the cache)."""
    digest = hashlib.sha256(json.dumps(getattr(module, "config", {}), default=str, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(np.float64(tensor.double().sum().item()).tobytes())
    return digest.hexdigest()[:16]


def caption_texts(record: TrainRecord, system_prompts: dict[str, SystemPrompt]) -> list[str]:
    """All text variants a record can be trained with (system prompt per domain applied)."""
    template = system_prompts.get(record.domain, SystemPrompt.A)
    return [apply_system_prompt(c.text, template) for c in record.captions]


def choose_caption(
    record: TrainRecord,
    rng: random.Random,
    granularity_weights: dict[str, float],
    language_weights: dict[str, float],
    system_prompts: dict[str, SystemPrompt],
) -> str:
    """Pick one caption variant, weighted by granularity and language."""
    texts = caption_texts(record, system_prompts)
    weights = [
        granularity_weights.get(c.granularity, 1.0) * language_weights.get(c.language, 1.0)
        for c in record.captions
    ]
    if sum(weights) <= 0:
        weights = [1.0] * len(texts)
    return rng.choices(texts, weights=weights, k=1)[0]


@dataclass
class FeatureCache:
    """In-memory view of the cached features for one stage."""

    latents: dict[str, torch.Tensor]  # record id -> (C, h, w)
    text: dict[str, torch.Tensor]  # caption text -> (L, D) valid tokens only
    buckets: dict[tuple[int, int], list[str]]  # (h, w) -> record ids

    def batch_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded caption features and mask for a batch of texts."""
        feats = [self.text[t] for t in texts]
        length = max(f.shape[0] for f in feats)
        embeds = torch.zeros(len(feats), length, feats[0].shape[1])
        mask = torch.zeros(len(feats), length, dtype=torch.long)
        for i, f in enumerate(feats):
            embeds[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        return embeds, mask


@torch.no_grad()
def build_cache(
    records: Sequence[TrainRecord],
    *,
    resolution: int,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer,
    system_prompts: dict[str, SystemPrompt],
    cache_dir: Path,
    batch_size: int = 8,
) -> FeatureCache:
    """Compute (or reuse) VAE latents per image at this stage's buckets and Gemma features per
    caption variant (plus the empty caption used by caption dropout)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    lat_file = cache_dir / f"latents-r{resolution}-{fingerprint(vae)}.pt"
    txt_file = cache_dir / f"text-{fingerprint(text_encoder)}.pt"
    latents: dict[str, torch.Tensor] = torch.load(lat_file) if lat_file.is_file() else {}
    text: dict[str, torch.Tensor] = torch.load(txt_file) if txt_file.is_file() else {}

    buckets = bucket_sizes(resolution)
    by_bucket: dict[tuple[int, int], list[str]] = {}
    todo: dict[tuple[int, int], list[TrainRecord]] = {}
    for rec in records:
        with Image.open(rec.image_path) as img:
            w, h = ImageOps.exif_transpose(img).size
        size = nearest_bucket(w, h, buckets)
        by_bucket.setdefault(size, []).append(rec.id)
        if rec.id not in latents:
            todo.setdefault(size, []).append(rec)
    n_new = sum(len(v) for v in todo.values())
    with tqdm(total=n_new, desc=f"latents {resolution}px", disable=n_new == 0, leave=False) as bar:
        for size, recs in todo.items():
            for i in range(0, len(recs), batch_size):
                chunk = recs[i : i + batch_size]
                pixels = torch.stack([load_image(r.image_path, size) for r in chunk])
                for rec, zi in zip(chunk, encode_pixels(vae, pixels), strict=True):
                    latents[rec.id] = zi.clone()
                bar.update(len(chunk))
    if n_new:
        torch.save(latents, lat_file)

    texts = sorted({t for r in records for t in caption_texts(r, system_prompts)} | {""} - set(text))
    for i in tqdm(range(0, len(texts), 32), desc="text features", disable=not texts, leave=False):
        chunk = texts[i : i + 32]
        emb = encode_prompts(chunk, tokenizer, text_encoder)
        for t, e, m in zip(chunk, emb.embeds, emb.mask, strict=True):
            text[t] = e[: int(m.sum())].float().clone()
    if texts:
        torch.save(text, txt_file)
    return FeatureCache(latents={r.id: latents[r.id] for r in records}, text=text, buckets=by_bucket)
