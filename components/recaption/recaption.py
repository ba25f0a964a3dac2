"""UniCap recaption step: multi-granularity, bilingual captions for every ingested image.

Backends: ``metadata`` (synthetic ground truth), ``alt-text`` (existing human captions), ``vlm``
(a Qwen2-VL-family captioner, :mod:`components.recaption.vlm`). ``auto`` picks, per image,
metadata when the image has ground truth, else the VLM when one is given, else its alt text.

Outputs in ``out_dir``: ``captions.parquet`` (image_id, granularity, language, text, backend),
``manifest.parquet`` (the ingest manifest + ``image_path``, ``domain``, ``captions`` JSON: the
training schema), ``failures.csv`` and ``dataset.json`` (content hash). Work is saved per shard,
so a rerun resumes; an image that fails is retried once, then reported, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from components.recaption.backends import alt_text_captions, metadata_captions, metadata_entry
from components.recaption.schema import caption_rows, captions_frame, training_captions
from model.errors import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "metadata", "alt-text", "vlm")
SHARD = 64
CAPTIONS_FILE, MANIFEST_FILE, FAILURES_FILE = "captions.parquet", "manifest.parquet", "failures.csv"

Captions = dict[str, dict[str, str]]
VlmFn = Callable[[Sequence[Image.Image]], list[tuple[Captions, str | None]]]


@dataclass
class RecaptionResult:
    manifest: Path
    captions: Path
    failures: Path
    images: int
    captions_written: int
    failed: int
    dataset_hash: str


def captioner_prompt_version() -> str:
    from components.recaption.vlm import PROMPT_VERSION

    return PROMPT_VERSION


def vlm_function(model: str | Path, **kwargs: Any) -> VlmFn:
    """Wrap :class:`components.recaption.vlm.VlmCaptioner` as ``images -> [(captions, error)]``."""
    from components.recaption.vlm import VlmCaptioner

    captioner = VlmCaptioner(model, **kwargs)

    def run(images: Sequence[Image.Image]) -> list[tuple[Captions, str | None]]:
        return [(r.captions, r.error) for r in captioner.caption(images)]

    run.model_id = str(model)  # type: ignore[attr-defined]
    run.prompt_version = captioner_prompt_version()  # type: ignore[attr-defined]
    return run


def _choose(row: dict, backend: str, has_vlm: bool) -> str:
    if backend != "auto":
        return backend
    if metadata_entry(str(row["source_path"])) is not None:
        return "metadata"
    return "vlm" if has_vlm else "alt-text"


def _caption_shard(
    rows: list[dict], dataset_dir: Path, backend: str, vlm: VlmFn | None
) -> tuple[list[dict], list[tuple[str, str, str]]]:
    out: list[dict] = []
    failures: list[tuple[str, str, str]] = []
    pending_vlm: list[dict] = []
    for row in rows:
        chosen = _choose(row, backend, vlm is not None)
        if chosen == "metadata":
            entry = metadata_entry(str(row["source_path"]))
            caps = metadata_captions(entry) if entry else {}
            reason = None if caps else "no ground-truth metadata"
        elif chosen == "alt-text":
            caps = alt_text_captions(row.get("caption"))
            reason = None if caps else "no alt text"
        else:
            pending_vlm.append(row)
            continue
        if reason:
            failures.append((row["id"], row["source_path"], f"{chosen}: {reason}"))
        else:
            out.extend(caption_rows(row["id"], caps, chosen))
    if pending_vlm:
        if vlm is None:
            raise ConfigError("backend 'vlm' needs a captioner model (--vlm-model)")
        out_rows, failed = _run_vlm(pending_vlm, dataset_dir, vlm)
        out.extend(out_rows)
        failures.extend(failed)
    return out, failures


def _run_vlm(
    rows: list[dict], dataset_dir: Path, vlm: VlmFn
) -> tuple[list[dict], list[tuple[str, str, str]]]:
    out: list[dict] = []
    todo = rows
    reasons: dict[str, str] = {}
    for _attempt in range(2):  # one retry for images that failed
        if not todo:
            break
        images = [Image.open(dataset_dir / r["path"]).convert("RGB") for r in todo]
        try:
            results = vlm(images)
        except Exception as exc:  # a backend crash fails the batch, which is retried, then reported
            results = [({}, f"{type(exc).__name__}: {exc}")] * len(todo)
        retry = []
        for row, (caps, error) in zip(todo, results, strict=True):
            rows_ = caption_rows(row["id"], caps, "vlm")
            if rows_ and error is None:  # all granularities in every language, or it is retried
                out.extend(rows_)
            else:
                reasons[row["id"]] = error or "no parsable caption in the model output"
                retry.append(row)
        todo = retry
    return out, [(r["id"], r["source_path"], f"vlm: {reasons[r['id']]}") for r in todo]


def run_recaption(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    backend: str = "auto",
    vlm: VlmFn | None = None,
    progress: bool = True,
) -> RecaptionResult:
    """Caption every image of an ingest dataset (``manifest.parquet`` + images) into ``out_dir``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown caption backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    source_manifest = dataset_dir / "manifest.parquet"
    if not source_manifest.is_file():
        raise ConfigError(f"ingest manifest not found: {source_manifest}")
    images = pd.read_parquet(source_manifest)
    out.mkdir(parents=True, exist_ok=True)
    captions_path, shard_dir = out / CAPTIONS_FILE, out / "shards"
    shard_dir.mkdir(exist_ok=True)
    # resume from a finished run's table plus the shards an interrupted run saved
    saved = ([captions_path] if captions_path.is_file() else []) + sorted(shard_dir.glob("*.parquet"))
    parts = [pd.read_parquet(p) for p in saved]
    finished = {i for part in parts for i in part["image_id"]}
    failures: list[tuple[str, str, str]] = []
    todo = [r for r in images.to_dict("records") if r["id"] not in finished]
    shards = [todo[i : i + SHARD] for i in range(0, len(todo), SHARD)]
    first = len(saved)
    for k, shard in enumerate(tqdm(shards, desc="recaption", disable=not progress, leave=False)):
        new, failed = _caption_shard(shard, dataset_dir, backend, vlm)
        failures.extend(failed)
        part = captions_frame(new)
        part.to_parquet(shard_dir / f"captions-{first + k:06d}.parquet", index=False)  # resume point
        parts.append(part)
    table = pd.concat(parts, ignore_index=True) if parts else captions_frame([])
    table.to_parquet(captions_path, index=False)
    for path in shard_dir.glob("*.parquet"):  # now in the table
        path.unlink()
    return _write_outputs(images, table, failures, out, backend, vlm)


def _write_outputs(
    images: pd.DataFrame,
    table: pd.DataFrame,
    failures: list[tuple[str, str, str]],
    out: Path,
    backend: str,
    vlm: VlmFn | None,
) -> RecaptionResult:
    by_image = {k: g.to_dict("records") for k, g in table.groupby("image_id", sort=False)}
    kept = images[images["id"].isin(by_image)].copy()
    kept["image_path"] = kept["path"]
    kept["caption_backend"] = [by_image[i][0]["backend"] for i in kept["id"]]
    kept["domain"] = ["synthetic" if b == "metadata" else "real" for b in kept["caption_backend"]]
    kept["captions"] = [training_captions(by_image[i]) for i in kept["id"]]
    manifest_path = out / MANIFEST_FILE
    kept.to_parquet(manifest_path, index=False)
    failures_path = out / FAILURES_FILE
    with open(failures_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "source", "reason"])
        writer.writerows(failures)
    digest = hashlib.sha256()
    for r in table.sort_values(["image_id", "language", "granularity"]).itertuples(index=False):
        digest.update(f"{r.image_id}\t{r.language}\t{r.granularity}\t{r.text}\n".encode())
    result = RecaptionResult(
        manifest_path,
        out / CAPTIONS_FILE,
        failures_path,
        len(kept),
        len(table),
        len(failures),
        digest.hexdigest(),
    )
    info = {
        "dataset_hash": result.dataset_hash,
        "images": result.images,
        "captions": result.captions_written,
        "failed": result.failed,
        "backend": backend,
        "vlm_model": getattr(vlm, "model_id", None),
        "prompt_version": getattr(vlm, "prompt_version", None),
        "backends_used": table["backend"].value_counts().to_dict(),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    log.info("recaption: %d images, %d captions, %d failed", result.images, len(table), result.failed)
    return result
