"""The per-group grid step of the pipeline (before the group's latents): the unified phase's data.

From the group's ``tiers.parquet`` (the tier fan-in's), the images of :attr:`GridConfig.tier` are
paired with condition maps into Template C grids (:func:`components.grids.grid.build_grids`; a
synthetic scene's exact maps when its source ``metadata.jsonl`` is reachable through the
``source_path`` the ingest step kept, else the annotators). The grid PNGs go into tar shards under
``<group prefix>/grids/`` (like the ingested images: only refs move between tasks), and a share of
ordinary images of the tier (:attr:`GridConfig.ordinary_share`) is drawn, seeded, for the mix.

The artifact folder gets :data:`UNIFIED_FILE`: one row per sample of the unified phase (grid rows
with domain ``grid``, their shard refs, size and ``grid_fill``; ordinary rows with their own
columns), every row flagged ``unified``; and ``grids.json`` (counts, annotators, what was not run).
The group's latent step encodes the grid rows and flags the ordinary ones
(:func:`components.latents.group.latents_group`). Turned off (``enabled=False``), the step writes
an empty file and the latent index has no unified rows.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from common.errors import ConfigError
from components.grids.grid import GRID_COLUMNS, IMAGES, SUMMARY, GridConfig, build_grids, grid_config
from components.ingest.merge import KEPT_FILE
from components.plan.plan import Group
from components.tier.tier import GROUP_TIERS_FILE
from components.train.config import STAGE_DEFAULTS, Stage
from model.prompts import GRID_DOMAIN
from storage import exists, join, read_parquet
from storage.shards import REF_COLUMNS, ShardWriter

log = logging.getLogger(__name__)

UNIFIED_FILE = "unified.parquet"
UNIFIED = str(Stage.UNIFIED)
SAMPLE_COLUMNS = ("id", "width", "height", "image_path", "domain", "captions", *REF_COLUMNS)


def unified_resolution(profile: str) -> int:
    """The resolution the profile's unified stage trains at (its grids' bucket area)."""
    if profile not in STAGE_DEFAULTS:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(STAGE_DEFAULTS)}")
    return int(STAGE_DEFAULTS[profile][Stage.UNIFIED]["resolution"])


def _with_source_paths(rows: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """``rows`` with the ingested file's ``source_path`` (from the group's kept files) when known."""
    kept_uri = join(prefix, KEPT_FILE)
    if "source_path" in rows.columns or not exists(kept_uri):
        return rows
    kept = read_parquet(kept_uri)
    if "source_path" not in kept.columns:
        return rows
    return rows.merge(kept[["id", "source_path"]].drop_duplicates("id"), on="id", how="left")


def _ordinary_mix(pool: pd.DataFrame, grids: int, share: float, seed: int, name: str) -> pd.DataFrame:
    """``share`` of the mix from the pool's ordinary images: ``grids * share / (1 - share)`` rows at
    most, drawn with a seed per group (the same on every retry)."""
    wanted = min(len(pool), round(grids * share / (1.0 - share)))
    if wanted <= 0:
        return pool.head(0)
    rng = random.Random(f"{seed}:{name}")
    chosen = sorted(rng.sample(range(len(pool)), wanted))
    return pool.iloc[chosen]


def _shard_grids(grids: list[dict[str, Any]], folder: Path, prefix: str, name: str) -> pd.DataFrame:
    """Pack the grid PNGs (``image_path`` under ``folder``) into shards under ``prefix``; the rows
    with shard refs instead of paths."""
    writer = ShardWriter(prefix, f"{name}-grids", max_members=1000)
    refs = {}
    for row in grids:
        refs[row["id"]] = writer.add(Path(row["image_path"]).name, (folder / row["image_path"]).read_bytes())
        if writer.full:
            writer.flush()
    writer.flush()
    frame = pd.DataFrame(grids)
    for column in REF_COLUMNS:
        frame[column] = [getattr(refs[i], column) for i in frame["id"]]
    frame["image_path"] = None
    return frame


def grids_group(
    group: Group,
    out_dir: str | Path,
    *,
    profile: str = "tiny",
    config: GridConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    enabled: bool = True,
) -> dict[str, Any]:
    """Build the group's unified-phase samples into ``out_dir`` (see the module docstring); returns
    the summary written to ``grids.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # what the config sets; the rest defaults, the resolution to the profile's unified stage
    raw = dict(config.model_dump(exclude_unset=True) if isinstance(config, GridConfig) else config or {})
    raw.setdefault("resolution", unified_resolution(profile))
    raw.setdefault("seed", seed)
    cfg = grid_config(raw)
    columns = [*SAMPLE_COLUMNS, *GRID_COLUMNS, UNIFIED]
    if not enabled:
        pd.DataFrame(columns=columns).to_parquet(out / UNIFIED_FILE, index=False)
        summary: dict[str, Any] = {"enabled": False, "group": group.name, "grids": 0, "ordinary": 0}
        (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    tiers = read_parquet(join(group.prefix, GROUP_TIERS_FILE))
    pool = tiers[tiers[cfg.tier].fillna(False).astype(bool)] if cfg.tier in tiers else tiers.head(0)
    pool = _with_source_paths(pool.reset_index(drop=True), group.prefix)
    with tempfile.TemporaryDirectory(prefix=f"grids-{group.name}-") as tmp:
        grids = build_grids(pool, tmp, cfg)
        built = json.loads((Path(tmp) / SUMMARY).read_text())
        frame = _shard_grids(grids, Path(tmp), join(group.prefix, "grids"), group.name) if grids else None
    ordinary = _ordinary_mix(pool, len(grids), cfg.ordinary_share, cfg.seed, group.name)
    parts = [ordinary.reindex(columns=columns)]
    if frame is not None:
        parts.append(frame.reindex(columns=columns))
    rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    rows[UNIFIED] = True
    rows.to_parquet(out / UNIFIED_FILE, index=False)
    summary = {"enabled": True, "group": group.name, "tier": cfg.tier, "pool": len(pool),
               "ordinary": len(ordinary), **built}  # fmt: skip
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("grids %s: %d grids and %d ordinary images from %d %s images", group.name, len(grids),
             len(ordinary), len(pool), cfg.tier)  # fmt: skip
    return summary


def unified_rows(folder: str | Path | None) -> tuple[pd.DataFrame, set[str]]:
    """What a group's grid step wrote (the artifact folder or its :data:`UNIFIED_FILE`): the grid
    rows and the ids of the ordinary images in the mix (empty when there is none)."""
    if folder is None:
        return pd.DataFrame(columns=[*SAMPLE_COLUMNS, *GRID_COLUMNS, UNIFIED]), set()
    path = Path(folder)
    path = path / UNIFIED_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"grid step output {path} not found")
    rows = pd.read_parquet(path)
    is_grid = rows["domain"] == GRID_DOMAIN
    return rows[is_grid].reset_index(drop=True), set(rows.loc[~is_grid, "id"].astype(str))


__all__ = ["IMAGES", "UNIFIED_FILE", "grids_group", "unified_resolution", "unified_rows"]
