"""Ingest one plan group: decode-check, measure, hash, drop exact duplicates within the group and
write the candidates as tar shards under the group's prefix (``storage.shards``).

Near duplicates and duplicates across groups are decided by the fan-in (:mod:`.merge`), which
replays the decisions in global source order, so any number of groups gives the result of one.

Checkpoints: each closed shard is followed by a part file (its manifest rows and the rejects seen
since the previous part) under ``<group prefix>/parts/``; a retried or preempted group reads its
parts, skips their sources unread and continues with the next shard index, so nothing written is
lost and a retry overwrites only this group's own outputs.

Local outputs (the KFP artifact): ``manifest.parquet`` (candidate rows in source order, ``seq``),
``rejects.csv`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from components.ingest.ingest import MANIFEST_COLUMNS, IngestOptions, _filter, decode_stream, iter_listing
from components.plan.plan import Group
from storage import join, list_objects, read_parquet, write_parquet
from storage.shards import ShardWriter

log = logging.getLogger(__name__)
REJECT_COLUMNS = ["source", "reason"]
GROUP_SUMMARY = "summary.json"  # written last: the group finished


@dataclass
class GroupResult:
    group: str
    out_dir: Path
    candidates: int
    rejected: int
    resumed_parts: int


def _load_parts(prefix: str) -> tuple[list[pd.DataFrame], list[pd.DataFrame], int]:
    """Rows and rejects saved by an earlier (interrupted) run of this group, and the next part index."""
    rows, rejects, last = [], [], -1
    for obj in list_objects(join(prefix, "parts"), must_exist=False):
        name = obj.uri.rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or name.startswith("."):
            continue
        kind, index = name.removesuffix(".parquet").split("-")
        (rows if kind == "rows" else rejects).append(read_parquet(obj.uri))
        last = max(last, int(index))
    return rows, rejects, last + 1


def ingest_group(
    group: Group,
    out_dir: str | Path,
    options: IngestOptions | None = None,
    *,
    progress: bool = True,
) -> GroupResult:
    """Ingest the entries of ``group`` (see the module docstring)."""
    opts = options or IngestOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listing = read_parquet(group.listing)
    saved_rows, saved_rejects, next_part = _load_parts(group.prefix)
    kept = pd.concat(saved_rows, ignore_index=True) if saved_rows else pd.DataFrame(columns=MANIFEST_COLUMNS)
    old_rejects = (
        pd.concat(saved_rejects, ignore_index=True) if saved_rejects else pd.DataFrame(columns=REJECT_COLUMNS)
    )
    consumed = set(kept["source_path"]) | set(old_rejects["source"])
    known = dict(zip(kept["sha256"], kept["id"], strict=True))
    items = iter_listing(listing, skip=consumed)
    writer = ShardWriter(
        join(group.prefix, "shards"), group.name, opts.shard_size, opts.shard_bytes, next_part
    )
    rows: list[dict] = []
    rejects: list[tuple[str, str]] = []
    new_rows: list[dict] = []
    seq = len(kept)

    def save_part() -> None:
        nonlocal new_rows, rejects
        if not new_rows and not rejects:
            return
        index = writer.index  # shard NNNNN and part NNNNN go together
        writer.flush()  # the shard first (a part only ever names a complete shard); then the next index
        if new_rows:
            frame = pd.DataFrame(new_rows, columns=MANIFEST_COLUMNS).astype({"phash": "uint64"})
            write_parquet(frame, join(group.prefix, "parts", f"rows-{index:05d}.parquet"))
        if rejects:
            frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
            write_parquet(frame, join(group.prefix, "parts", f"rejects-{index:05d}.parquet"))
        rows.extend(new_rows)
        all_rejects.extend(rejects)
        new_rows, rejects = [], []

    all_rejects: list[tuple[str, str]] = []
    disable = None if progress else True  # None: the TQDM_DISABLE environment variable decides
    stream = tqdm(
        decode_stream(items, opts), desc=f"ingest {group.name}", unit="img", leave=False, disable=disable
    )
    for item, res in stream:
        if isinstance(res, str):
            rejects.append((item.source, res))
            continue
        if res.sha256 in known:
            rejects.append((item.source, f"duplicate_of:{known[res.sha256]}"))
            continue
        reason = _filter(res, opts)
        if reason:
            rejects.append((item.source, reason))
            continue
        image_id = res.sha256[:16]
        ext = {"JPEG": "jpg"}.get(res.format, res.format.lower())
        ref = writer.add(f"{image_id}.{ext}", res.data)
        row = {k: v for k, v in asdict(res).items() if k not in ("data", "source")}
        row.update(id=image_id, source_path=item.source, group=group.name, seq=seq, **ref.as_row())
        row["phash"] = int(res.phash)
        new_rows.append(row)
        known[res.sha256] = image_id
        seq += 1
        if writer.full:
            save_part()
    save_part()

    manifest = pd.concat([kept, pd.DataFrame(rows, columns=MANIFEST_COLUMNS)], ignore_index=True)
    manifest = manifest.astype({"phash": "uint64", "seq": "int64"}).sort_values("seq", kind="stable")
    manifest.to_parquet(out / "manifest.parquet", index=False)
    all_frame = pd.concat([old_rejects, pd.DataFrame(all_rejects, columns=REJECT_COLUMNS)], ignore_index=True)
    with open(out / "rejects.csv", "w", newline="") as fh:
        writer_csv = csv.writer(fh)
        writer_csv.writerow(REJECT_COLUMNS)
        writer_csv.writerows(all_frame.itertuples(index=False))
    summary = {
        "group": group.name,
        "group_item": group.to_json(),
        "candidates": len(manifest),
        "rejected": len(all_frame),
        "resumed_parts": next_part,
    }
    (out / GROUP_SUMMARY).write_text(json.dumps(summary))
    log.info("ingest %s: %d candidates, %d rejected (%d parts resumed)", group.name, len(manifest),
             len(all_frame), next_part)  # fmt: skip
    return GroupResult(group.name, out, len(manifest), len(all_frame), next_part)
