"""Where a stage's training samples come from: the latent index the pipeline built, or one
encoded here from the stage's manifest; and (``text_features: cache``) the caption features.

- :func:`usable_index`: the given latent index, if it holds latents at the stage's resolution for
  the stage's VAE with the caption columns; otherwise a warning and ``None``.
- :func:`encode_manifest`: encode the manifest (read in parts of ``part_rows``, so memory is one
  part) into ``<cache_dir>/latents-r<res>-<vae>-m<manifest sha>/part-NNNNN.*``, the same layout
  :mod:`components.latents` writes, finished by a ``COMPLETE`` marker so a rerun (or a resumed
  stage) reuses it. Only rank 0 encodes; the other ranks wait at a barrier and read the result.
- :func:`text_feature_cache`: Gemma features of every caption variant of the stage (small
  datasets only: memory grows with the captions; the paper's scale encodes captions online).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from common.errors import ConfigError
from components.latents.cache import (
    OPTIONAL_SAMPLE_COLUMNS,
    SAMPLE_COLUMNS,
    build_latents,
    index_files,
    read_index_columns,
    write_latent_index,
)
from components.train.data import TrainRecord, caption_texts, iter_manifest
from components.train.loader import StageFilter, sample_record, stage_rows
from model.prompts import SystemPrompt
from model.text import encode_prompts

log = logging.getLogger(__name__)
PART_ROWS = 1024
DONE = "COMPLETE"


def usable_index(index: str | Path, flt: StageFilter) -> list[str] | None:
    """The index files, when some hold latents for this stage (resolution, VAE) with captions;
    else ``None`` with a warning saying what the index has (the stage then encodes its manifest).
    Reads the filter columns one file at a time (what the index has is kept as a small set)."""
    files = index_files(index)
    have: set[tuple[int, str]] = set()
    lacking = []
    for uri in files:
        frame = read_index_columns(uri, ["resolution", "vae_fingerprint"])
        pairs = {(int(r), str(f)) for r, f in frame.drop_duplicates().itertuples(index=False)}
        have |= pairs
        has_samples = set(SAMPLE_COLUMNS) <= set(frame.attrs["names"])
        if (flt.resolution, flt.vae_fingerprint) in pairs and not has_samples:
            lacking.append(uri)
    if (flt.resolution, flt.vae_fingerprint) in have:
        if not lacking:
            return files
        log.warning("latent index %s has no caption columns (e.g. %s, built before they were added); "
                    "encoding latents instead", index, lacking[0])  # fmt: skip
        return None
    at_res = sorted(f for r, f in have if r == flt.resolution)
    if not at_res:
        found = ", ".join(str(r) for r in sorted({r for r, _ in have})) or "none"
        log.warning("latent index %s has no latents at %dpx (it has: %s); encoding latents instead",
                    index, flt.resolution, found)  # fmt: skip
    else:
        log.warning("latent index %s was built with VAE fingerprint %s, this stage's VAE is %s; "
                    "encoding latents instead", index, ", ".join(at_res), flt.vae_fingerprint)  # fmt: skip
    return None


def local_index_dir(cache_dir: Path, manifest: Path, image_root: Path | None, flt: StageFilter) -> Path:
    """Where :func:`encode_manifest` puts a manifest's latents (keyed by content, not by path)."""
    with open(manifest, "rb") as fh:  # streamed: a manifest of 110M rows is gigabytes
        digest = hashlib.file_digest(fh, "sha256")
    digest.update(str(image_root or manifest.parent.resolve()).encode())
    return cache_dir / f"latents-r{flt.resolution}-{flt.vae_fingerprint}-m{digest.hexdigest()[:16]}"


def encode_manifest(
    manifest: Path,
    image_root: Path | None,
    vae: torch.nn.Module,
    flt: StageFilter,
    cache_dir: Path,
    part_rows: int = PART_ROWS,
) -> Path:
    """Encode the manifest's images into a local latent index (reused when already complete)."""
    out = local_index_dir(cache_dir, manifest, image_root, flt)
    if (out / DONE).is_file():
        log.info("latents %dpx: reusing %s", flt.resolution, out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    parts = iter_manifest(manifest, image_root, batch_rows=part_rows)
    for number, records in enumerate(tqdm(parts, desc=f"latents {flt.resolution}px", leave=False)):
        name = f"part-{number:05d}"
        index_uri = out / f"{name}.index.parquet"
        if index_uri.is_file():  # a part finished by an interrupted earlier run
            total += len(pd.read_parquet(index_uri, columns=["id"]))
            continue
        rows = pd.DataFrame([_manifest_row(r) for r in records])
        frame = build_latents(rows, vae=vae, resolution=flt.resolution, out_prefix=str(out), name=name)
        write_latent_index(frame, index_uri)
        total += len(frame)
    if total == 0:
        raise ConfigError(f"training manifest {manifest}: no image could be read or encoded")
    (out / DONE).write_text(json.dumps({"images": total}))
    log.info("latents %dpx: %d images encoded into %s", flt.resolution, total, out)
    return out


def _manifest_row(record: TrainRecord) -> dict:
    captions = [dataclasses.asdict(c) for c in record.captions]
    return {
        "id": record.id,
        **record.source_row(),
        "width": record.width,
        "height": record.height,
        "domain": record.domain,
        "captions": json.dumps(captions),
        "grid_fill": record.grid_fill,
    }


def stage_records(files: Sequence[str], flt: StageFilter) -> list[TrainRecord]:
    """Every record of the stage (captions, domain, bucket) — for the text-feature cache only."""
    records = []
    for uri in files:
        columns = ["id", "height", "width", *SAMPLE_COLUMNS, *OPTIONAL_SAMPLE_COLUMNS]
        frame = stage_rows(uri, flt, columns=columns)
        records += [sample_record(r) for r in frame.to_dict("records")]
    return records


@torch.no_grad()
def text_feature_cache(
    files: Sequence[str],
    flt: StageFilter,
    *,
    text_encoder: torch.nn.Module,
    tokenizer,
    system_prompts: dict[str, SystemPrompt],
    cache_file: Path,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Features (valid tokens only) of every caption variant of the stage and of the empty caption
    used by caption dropout, reusing and extending ``cache_file``."""
    text: dict[str, torch.Tensor] = torch.load(cache_file) if cache_file.is_file() else {}
    wanted = {t for r in stage_records(files, flt) for t in caption_texts(r, system_prompts)} | {""}
    todo = sorted(wanted - set(text))
    for i in tqdm(range(0, len(todo), batch_size), desc="text features", disable=not todo, leave=False):
        chunk = todo[i : i + batch_size]
        emb = encode_prompts(chunk, tokenizer, text_encoder)
        for t, e, m in zip(chunk, emb.embeds, emb.mask, strict=True):
            text[t] = e[: int(m.sum())].float().clone()
    if todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(text, cache_file)
    return {t: text[t] for t in wanted}


__all__ = ["encode_manifest", "local_index_dir", "text_feature_cache", "usable_index"]
