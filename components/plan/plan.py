"""List a source (keys, sizes, ETags / mtimes) and split it into contiguous groups.

The plan is the unit of fan-out: every data step (ingest, recaption, scoring) runs once per group,
and a group is a pure function of the listing, so a retried group rewrites only its own outputs
and parallelism 1 and N give the same result. The listing's fingerprint (keys + sizes + change
tokens + ingest options) keys everything written for it: a source that did not change hits the
same key (and KFP's cache); a new or changed object gives a new key.

Written under ``<data_root>/ingest-<fingerprint16>/``: ``plan/<group>.parquet`` (the group's
listing: ``uri``, ``size``, ``version``, ``kind`` image|tar, ``caption_uri``) and ``plan.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from common.errors import ConfigError
from storage import ObjectInfo, is_s3, join, list_objects, write_bytes, write_parquet

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
LISTING_COLUMNS = ["uri", "size", "version", "kind", "caption_uri"]


@dataclass(frozen=True)
class Group:
    """One unit of fan-out (what a ParallelFor item carries, as JSON)."""

    name: str  # g00000, g00001, ... (sorts in source order)
    listing: str  # URI of the group's listing Parquet
    prefix: str  # where the group's outputs go (shards, parts)
    entries: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Group:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not a plan group: {text[:80]!r} ({exc})") from None


@dataclass
class Plan:
    source: str
    key: str  # <data_root>/ingest-<fingerprint16>
    fingerprint: str
    groups: list[Group] = field(default_factory=list)

    @property
    def group_items(self) -> list[str]:
        return [g.to_json() for g in self.groups]


def _kind(uri: str) -> str | None:
    suffix = PurePosixPath(uri).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "tar" if suffix == ".tar" else None


def list_source(source: str) -> pd.DataFrame:
    """The images and ``.tar`` shards of a folder, a ``.tar`` file or an ``s3://`` prefix, sorted, with
    the ``.txt`` caption beside each image. A source that does not exist (or an empty / unreadable
    prefix) is one :class:`ConfigError` line."""
    source = str(source)
    if not is_s3(source) and not (
        Path(source).is_dir() or (Path(source).is_file() and source.endswith(".tar"))
    ):
        raise ConfigError(f"ingest source not found or not a folder / .tar shard / s3:// prefix: {source}")
    try:
        objects: list[ObjectInfo] = list(list_objects(source))
    except ConfigError as exc:
        raise ConfigError(f"ingest source not found or not readable: {exc}") from None
    captions = {o.uri for o in objects if o.uri.endswith(".txt")}
    rows = []
    for obj in objects:
        kind = _kind(obj.uri)
        if kind is None:
            continue
        caption = obj.uri.rsplit(".", 1)[0] + ".txt" if kind == "image" else ""  # the .txt beside it
        rows.append((obj.uri, obj.size, obj.version, kind, caption if caption in captions else ""))
    return pd.DataFrame(rows, columns=LISTING_COLUMNS)


def fingerprint(listing: pd.DataFrame, options: dict | None = None) -> str:
    """Content fingerprint of a listing (keys, sizes, change tokens) and the options applied to it."""
    digest = hashlib.sha256(json.dumps(options or {}, sort_keys=True).encode())
    for row in listing.itertuples(index=False):
        digest.update(f"{row.uri}\t{row.size}\t{row.version}\t{row.caption_uri}\n".encode())
    return digest.hexdigest()


def split(listing: pd.DataFrame, group_size: int, group_bytes: int) -> list[pd.DataFrame]:
    """Contiguous groups of at most ``group_size`` entries and about ``group_bytes`` bytes."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(listing["size"].tolist()):
        if i > start and (i - start >= group_size or total + size > group_bytes):
            groups.append(listing.iloc[start:i])
            start, total = i, 0
        total += size
    if start < len(listing):
        groups.append(listing.iloc[start:])
    return groups


def plan_source(
    source: str,
    data_root: str,
    *,
    group_size: int = 5000,
    group_bytes: int = 2 << 30,
    options: dict | None = None,
) -> Plan:
    """List ``source``, split it into groups and write each group's listing under the plan key."""
    if group_size < 1 or group_bytes < 1:
        raise ConfigError("group_size and group_bytes must be at least 1")
    if not str(data_root).strip():
        raise ConfigError("no data root: set data_root (s3://bucket/prefix on a cluster, or a folder)")
    listing = list_source(source)
    if listing.empty:
        raise ConfigError(f"no images or .tar shards under {source}")
    digest = fingerprint(listing, {"source": str(source), **(options or {})})
    key = join(data_root, f"ingest-{digest[:16]}")
    plan = Plan(str(source), key, digest)
    for i, part in enumerate(split(listing, group_size, group_bytes)):
        name = f"g{i:05d}"
        uri = join(key, "plan", f"{name}.parquet")
        write_parquet(part, uri)
        plan.groups.append(Group(name, uri, join(key, "groups", name), len(part)))
    summary = {"source": plan.source, "key": key, "fingerprint": digest, "groups": plan.group_items,
               "entries": len(listing), "bytes": int(listing["size"].sum())}  # fmt: skip
    write_bytes(join(key, "plan.json"), json.dumps(summary, indent=2).encode())
    log.info("plan: %d entries (%d bytes) in %d groups under %s", len(listing), summary["bytes"],
             len(plan.groups), key)  # fmt: skip
    return plan


def source_fingerprint(groups: Sequence[str]) -> str:
    """The plan's source fingerprint (its ``ingest-<fingerprint16>`` key) from its group items: the
    same for an unchanged source, another one as soon as an object is added, changed or removed."""
    if not groups:
        raise ConfigError("the plan has no groups")
    match = re.search(r"ingest-([0-9a-f]{16})", Group.from_json(groups[0]).prefix)
    if match is None:
        raise ConfigError(f"not a planned group prefix: {Group.from_json(groups[0]).prefix}")
    return match.group(1)


def group_outputs(
    folders: Sequence[str | Path], groups: Sequence[Group], marker: str, step: str
) -> dict[str, Path]:
    """A fan-in's inputs by group name: each folder names its group in ``marker`` (a JSON file its
    step writes last). A planned group without a finished folder fails with one line naming it."""
    found: dict[str, Path] = {}
    for folder in map(Path, folders):
        if (folder / marker).is_file() and (name := json.loads((folder / marker).read_text()).get("group")):
            found[name] = folder
    missing = [g.name for g in groups if g.name not in found]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{step} fan-in: group {missing[0]}{more} has no output (failed or not run)")
    return found
