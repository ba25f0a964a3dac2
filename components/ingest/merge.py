"""Fan-in of ingest: merge the group manifests and decide duplicates across the whole source.

The decisions are replayed in global source order (group name, then ``seq``): a candidate is kept
unless its content hash was kept before (``duplicate_of``) or a kept image is within the
perceptual-hash distance with a matching colour layout (``near_duplicate_of``). This is exactly
what one pass over the whole source decides, so the kept set does not depend on how the source was
grouped. Memory: the replay holds the content hash, id, perceptual hash and colour signature of
each kept image (about 550 bytes an image); the full rows are read and written one group at a time.

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
import pyarrow as pa
import pyarrow.parquet as pq

from components.ingest.group import GROUP_SUMMARY
from components.ingest.ingest import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    IngestOptions,
    IngestResult,
    NearDuplicateIndex,
)
from components.ingest.sidecar import CaptionSidecar, load_sidecar, relative_source
from components.plan.plan import Group, group_outputs
from storage import join, write_parquet

log = logging.getLogger(__name__)
NARROW = ["id", "sha256", "phash", "color_sig", "source_path", "seq"]
KEPT_FILE = "kept.parquet"


def merge_groups(
    group_dirs: Sequence[str | Path],
    groups: Sequence[Group],
    out_dir: str | Path,
    options: IngestOptions | None = None,
    *,
    captions: str | Path | CaptionSidecar | None = None,
    source_root: str = "",
) -> IngestResult:
    """Merge the outputs of ``groups`` (their folders in any order) into ``out_dir``. ``captions``: a
    caption sidecar table (:mod:`.sidecar`; a path, or one already loaded), applied here, once, to
    every kept image by its path relative to ``source_root``; it wins over a caption found beside
    the image."""
    sidecar = (
        captions if isinstance(captions, CaptionSidecar) else load_sidecar(captions) if captions else None
    )
    opts = options or IngestOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(groups, key=lambda g: g.name)
    folders = group_outputs(group_dirs, ordered, GROUP_SUMMARY, "ingest")
    known: dict[str, str] = {}
    near = NearDuplicateIndex(opts.dedup_distance)
    decisions: list[tuple[str, str]] = []
    digest_rows: list[str] = []
    kept_total = 0
    with pq.ParquetWriter(out / "manifest.parquet", MANIFEST_SCHEMA) as manifest:
        for group in ordered:  # one group's rows in memory at a time
            frame = pd.read_parquet(folders[group.name] / "manifest.parquet")
            if frame.empty:  # every image of the group was rejected (its rejects say why)
                write_parquet(pd.DataFrame(columns=MANIFEST_COLUMNS), join(group.prefix, KEPT_FILE))
                continue
            frame = frame.sort_values("seq", kind="stable")
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
                kept["caption"] = [
                    f if f is not None else c for f, c in zip(found, kept["caption"], strict=True)
                ]
            write_parquet(kept, join(group.prefix, KEPT_FILE))
            manifest.write_table(
                pa.Table.from_pandas(kept[MANIFEST_COLUMNS], MANIFEST_SCHEMA, preserve_index=False)
            )
            kept_total += len(kept)

    rejected = 0
    with open(out / "rejects.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "reason"])
        for group in ordered:
            with open(folders[group.name] / "rejects.csv", newline="") as src:
                rows = csv.reader(src)
                next(rows)  # the header
                for row in rows:
                    writer.writerow(row)
                    rejected += 1
        writer.writerows(decisions)
        rejected += len(decisions)
    digest = hashlib.sha256("".join(sorted(digest_rows)).encode()).hexdigest()
    unmatched = sidecar.unmatched if sidecar is not None else 0
    result = IngestResult(
        out / "manifest.parquet", out / "rejects.csv", kept_total, rejected, digest, unmatched
    )
    info = {"dataset_hash": digest, "kept": kept_total, "rejected": rejected, "groups": len(ordered),
            "group_names": [g.name for g in ordered]}  # fmt: skip
    if sidecar is not None:
        info.update(sidecar=str(sidecar.path), sidecar_unmatched=unmatched)
        if unmatched:
            log.warning(
                "caption sidecar: %d of %d rows matched no ingested image", unmatched, len(sidecar.captions)
            )
    (out / "dataset.json").write_text(json.dumps(info))
    log.info("ingest: kept %d, rejected %d over %d groups, dataset %s", kept_total, rejected,
             len(ordered), digest[:12])  # fmt: skip
    return result
