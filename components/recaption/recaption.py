"""UniCap recaption step: multi-granularity, multi-perspective, bilingual captions for every ingested
image.

Backends: ``metadata`` (synthetic ground truth), ``alt-text`` (existing human captions), ``vlm``
(a Qwen2-VL-family captioner, :mod:`components.recaption.vlm`). ``auto`` picks, per image,
metadata when the image has ground truth, else the VLM when one is given, else its alt text.
The four lengths are what an image needs (missing ones: retried, then reported); the perspectives
(style, main object, objects, attributes, spatial, ocr; stored as further ``granularity`` values)
are kept when delivered, and a captioner's missing perspectives are logged, never fatal.

Outputs in ``out_dir``: ``captions.parquet`` (image_id, granularity, language, text, backend),
``manifest.parquet`` (the ingest manifest + ``domain``, ``captions`` JSON: the training schema; images
stay in their shards), ``failures.csv`` and ``dataset.json`` (content hash). Work is saved per batch,
so a rerun resumes; an image that fails is retried once, then reported, never fatal.

Fan-out: :func:`recaption_group` captions one plan group (its ``kept.parquet`` from the ingest
fan-in), reading only that group's shards; :func:`merge_captions` is the fan-in (one table, one
hash, the caption gate on the whole). :func:`run_recaption` does the same in one process.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from common.errors import ConfigError
from components.plan.plan import Group, group_outputs
from components.recaption.backends import alt_text_captions, metadata_captions, metadata_entry
from components.recaption.config import BACKENDS
from components.recaption.schema import caption_rows, captions_frame, training_captions
from storage import join, read_parquet
from storage.shards import image_bytes

log = logging.getLogger(__name__)
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
    """Wrap :class:`components.recaption.vlm.VlmCaptioner` as ``images -> [(captions, error)]``
    (``kwargs``: the captioner's, e.g. ``perspectives``, ``max_pixels``; see
    :meth:`components.recaption.config.RecaptionConfig.captioner_kwargs`). ``error`` is about the four
    lengths; missing perspectives are logged (they do not fail an image)."""
    from components.recaption.vlm import VlmCaptioner

    captioner = VlmCaptioner(model, **kwargs)

    def run(images: Sequence[Image.Image]) -> list[tuple[Captions, str | None]]:
        results = captioner.caption(images)
        partial = [r.perspective_error for r in results if r.error is None and r.perspective_error]
        if partial:
            log.warning(
                "vlm: %d of %d images lack some perspectives (e.g. %s)",
                len(partial),
                len(results),
                partial[0],
            )
        return [(r.captions, r.error) for r in results]

    run.model_id = str(model)  # type: ignore[attr-defined]
    run.prompt_version = captioner_prompt_version()  # type: ignore[attr-defined]
    run.perspectives = list(captioner.perspectives)  # type: ignore[attr-defined]
    run.max_pixels = captioner.max_pixels  # type: ignore[attr-defined]
    return run


def _choose(row: dict, backend: str, has_vlm: bool) -> str:
    if backend != "auto":
        return backend
    if metadata_entry(str(row["source_path"])) is not None:
        return "metadata"
    return "vlm" if has_vlm else "alt-text"


def _caption_shard(
    rows: list[dict], dataset_dir: Path | None, backend: str, vlm: VlmFn | None
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
    rows: list[dict], dataset_dir: Path | None, vlm: VlmFn
) -> tuple[list[dict], list[tuple[str, str, str]]]:
    out: list[dict] = []
    todo = rows
    reasons: dict[str, str] = {}
    for _attempt in range(2):  # one retry for images that failed
        if not todo:
            break
        images = [Image.open(io.BytesIO(image_bytes(r, dataset_dir))).convert("RGB") for r in todo]
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
    """Caption every image of an ingest dataset (its ``manifest.parquet``) into ``out_dir``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown caption backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    source_manifest = Path(dataset_dir) / "manifest.parquet"
    if not source_manifest.is_file():
        raise ConfigError(f"ingest manifest not found: {source_manifest}")
    images = pd.read_parquet(source_manifest)
    return caption_images(
        images, out_dir, backend=backend, vlm=vlm, progress=progress, root=Path(dataset_dir)
    )


def recaption_group(
    group: Group,
    out_dir: str | Path,
    *,
    backend: str = "auto",
    vlm: VlmFn | None = None,
    progress: bool = True,
) -> RecaptionResult:
    """Caption the kept images of one plan group (``<group prefix>/kept.parquet``, written by the
    ingest fan-in) into ``out_dir``; only this group's shards are read."""
    from components.ingest.merge import KEPT_FILE

    images = read_parquet(join(group.prefix, KEPT_FILE))
    return caption_images(images, out_dir, backend=backend, vlm=vlm, progress=progress, group=group.name)


def caption_images(
    images: pd.DataFrame,
    out_dir: str | Path,
    *,
    backend: str = "auto",
    vlm: VlmFn | None = None,
    progress: bool = True,
    root: Path | None = None,
    group: str | None = None,
) -> RecaptionResult:
    """Caption the images of an ingest manifest frame (bytes read from their shards) into ``out_dir``
    (``group``: the plan group they are, named in ``dataset.json`` for the fan-in)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown caption backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions_path, shard_dir = out / CAPTIONS_FILE, out / "shards"
    shard_dir.mkdir(exist_ok=True)
    # resume from a finished run's table plus the batches an interrupted run saved
    saved = ([captions_path] if captions_path.is_file() else []) + sorted(shard_dir.glob("*.parquet"))
    parts = [pd.read_parquet(p) for p in saved]
    finished = {i for part in parts for i in part["image_id"]}
    failures: list[tuple[str, str, str]] = []
    todo = [r for r in images.to_dict("records") if r["id"] not in finished]
    shards = [todo[i : i + SHARD] for i in range(0, len(todo), SHARD)]
    first = len(saved)
    for k, shard in enumerate(tqdm(shards, desc="recaption", disable=not progress, leave=False)):
        new, failed = _caption_shard(shard, root, backend, vlm)
        failures.extend(failed)
        part = captions_frame(new)
        part.to_parquet(shard_dir / f"captions-{first + k:06d}.parquet", index=False)  # resume point
        parts.append(part)
    table = pd.concat(parts, ignore_index=True) if parts else captions_frame([])
    table.to_parquet(captions_path, index=False)
    for path in shard_dir.glob("*.parquet"):  # now in the table
        path.unlink()
    return _write_outputs(images, table, failures, out, backend, vlm, group=group)


def merge_captions(
    group_dirs: Sequence[str | Path], groups: Sequence[Group], out_dir: str | Path
) -> RecaptionResult:
    """Fan-in: the groups' captions, training manifests and failures as one set (the same files and
    hash :func:`run_recaption` writes for the whole dataset). A planned group without output is one
    line naming it."""
    found = group_outputs(group_dirs, groups, "dataset.json", "recaption")
    ordered = [found[g.name] for g in sorted(groups, key=lambda g: g.name)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([pd.read_parquet(f / CAPTIONS_FILE) for f in ordered], ignore_index=True)
    table.to_parquet(out / CAPTIONS_FILE, index=False)
    manifest = pd.concat([pd.read_parquet(f / MANIFEST_FILE) for f in ordered], ignore_index=True)
    failures = [row for f in ordered for row in _read_failures(f / FAILURES_FILE)]
    infos = [json.loads((f / "dataset.json").read_text()) for f in ordered]
    vlm_info = next((i for i in infos if i.get("vlm_model")), {})
    backend = infos[0]["backend"] if infos else "auto"
    model, version = vlm_info.get("vlm_model"), vlm_info.get("prompt_version")
    return _write_outputs(
        manifest,
        table,
        failures,
        out,
        backend,
        None,
        vlm_model=model,
        prompt_version=version,
        vlm_settings={k: vlm_info[k] for k in ("vlm_perspectives", "vlm_max_pixels") if k in vlm_info},
    )


def _read_failures(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as fh:
        return [tuple(row) for row in list(csv.reader(fh))[1:]]


def _write_outputs(
    images: pd.DataFrame,
    table: pd.DataFrame,
    failures: list[tuple[str, str, str]],
    out: Path,
    backend: str,
    vlm: VlmFn | None,
    *,
    vlm_model: str | None = None,
    prompt_version: str | None = None,
    group: str | None = None,
    vlm_settings: dict[str, Any] | None = None,
) -> RecaptionResult:
    by_image = {k: g.to_dict("records") for k, g in table.groupby("image_id", sort=False)}
    kept = images[images["id"].isin(by_image)].copy()
    if "captions" not in kept.columns or kept.empty:  # a merged manifest already has them
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
        "vlm_model": getattr(vlm, "model_id", vlm_model),
        "prompt_version": getattr(vlm, "prompt_version", prompt_version),
        **(vlm_settings or {}),
        **({"vlm_perspectives": vlm.perspectives} if hasattr(vlm, "perspectives") else {}),
        **({"vlm_max_pixels": vlm.max_pixels} if hasattr(vlm, "max_pixels") else {}),
        "backends_used": table["backend"].value_counts().to_dict(),
        **({"group": group} if group else {}),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))  # written last: the step finished
    log.info("recaption: %d images, %d captions, %d failed", result.images, len(table), result.failed)
    return result
