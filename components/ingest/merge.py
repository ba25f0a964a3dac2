"""Fan-in of ingest: merge the group manifests and decide duplicates across the whole source.

The decisions are replayed in global source order (group name, then ``seq``): a candidate is kept
unless its content hash was kept before (``duplicate_of``) or a kept image is within the
perceptual-hash distance with a matching colour layout (``near_duplicate_of``). This is exactly
what one pass over the whole source decides, so the kept set does not depend on how the source was
grouped. Memory: the replay holds the content hash, id and perceptual hash of each kept image
(about 150 bytes an image); the full rows are streamed group by group.

Outputs: ``manifest.parquet`` (kept rows), ``rejects.csv`` (group rejects + merge decisions),
``dataset.json``; and ``<group prefix>/kept.parquet`` on storage for each group's later steps.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from components.ingest.ingest import IngestOptions, IngestResult, NearDuplicateIndex
from components.ingest.sidecar import load_sidecar, relative_source
from components.plan.plan import Group
from model.errors import ConfigError
from storage import join, write_bytes

log = logging.getLogger(__name__)
NARROW = ["id", "sha256", "phash", "color_sig", "source_path", "seq"]
KEPT_FILE = "kept.parquet"


def _group_outputs(group_dirs: Sequence[str | Path], groups: Sequence[Group]) -> dict[str, Path]:
    """Each planned group's output folder; a group that is missing or did not finish is one line."""
    found: dict[str, Path] = {}
    for folder in map(Path, group_dirs):
        summary = folder / "summary.json"
        if summary.is_file():
            found[json.loads(summary.read_text())["group"]] = folder
    missing = [
        g.name for g in groups if g.name not in found or not (found[g.name] / "manifest.parquet").is_file()
    ]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"ingest fan-in: group {missing[0]}{more} has no output (failed or not run)")
    return found


def merge_groups(
    group_dirs: Sequence[str | Path],
    groups: Sequence[Group],
    out_dir: str | Path,
    options: IngestOptions | None = None,
    *,
    captions: str | Path | None = None,
    source_root: str = "",
) -> IngestResult:
    """Merge the outputs of ``groups`` (their folders in any order) into ``out_dir``. ``captions``: a
    caption sidecar table (:mod:`.sidecar`), applied here, once, to every kept image by its path
    relative to ``source_root``; it wins over a caption found beside the image."""
    sidecar = load_sidecar(captions) if captions else None  # a bad sidecar fails before anything is written
    opts = options or IngestOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(groups, key=lambda g: g.name)
    folders = _group_outputs(group_dirs, ordered)
    known: dict[str, str] = {}
    near = NearDuplicateIndex(opts.dedup_distance)
    decisions: list[tuple[str, str]] = []
    kept_frames = []
    digest_rows: list[str] = []
    for group in ordered:
        frame = pd.read_parquet(folders[group.name] / "manifest.parquet").sort_values("seq", kind="stable")
        keep = []
        for row in frame[NARROW].itertuples(index=False):
            if row.sha256 in known:
                decisions.append((row.source_path, f"duplicate_of:{known[row.sha256]}"))
                keep.append(False)
                continue
            if (other := near.find(int(row.phash), row.color_sig or "")) is not None:
                decisions.append((row.source_path, f"near_duplicate_of:{other}"))
                keep.append(False)
                continue
            known[row.sha256] = row.id
            near.add(int(row.phash), row.color_sig or "", row.id)
            digest_rows.append(f"{row.id}:{row.sha256}\n")
            keep.append(True)
        kept = frame[keep].copy()
        if sidecar is not None and len(kept):
            found = [sidecar.lookup(relative_source(source_root, s)) for s in kept["source_path"]]
            kept["caption"] = [f if f is not None else c for f, c in zip(found, kept["caption"], strict=True)]
        write_bytes(join(group.prefix, KEPT_FILE), kept.to_parquet(index=False))
        kept_frames.append(kept)
    manifest = pd.concat(kept_frames, ignore_index=True)
    manifest.to_parquet(out / "manifest.parquet", index=False)

    rejected = 0
    with open(out / "rejects.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "reason"])
        for group in ordered:
            with open(folders[group.name] / "rejects.csv", newline="") as src:
                for row in list(csv.reader(src))[1:]:
                    writer.writerow(row)
                    rejected += 1
        writer.writerows(decisions)
        rejected += len(decisions)
    digest = hashlib.sha256("".join(sorted(digest_rows)).encode()).hexdigest()
    unmatched = sidecar.unmatched if sidecar is not None else 0
    result = IngestResult(
        out / "manifest.parquet", out / "rejects.csv", len(manifest), rejected, digest, unmatched
    )
    info = {"dataset_hash": digest, "kept": len(manifest), "rejected": rejected, "groups": len(ordered),
            "group_names": [g.name for g in ordered]}  # fmt: skip
    if sidecar is not None:
        info.update(sidecar=str(sidecar.path), sidecar_unmatched=unmatched)
        if unmatched:
            log.warning(
                "caption sidecar: %d of %d rows matched no ingested image", unmatched, len(sidecar.captions)
            )
    (out / "dataset.json").write_text(json.dumps(info))
    log.info("ingest: kept %d, rejected %d over %d groups, dataset %s", len(manifest), rejected,
             len(ordered), digest[:12])  # fmt: skip
    return result
