"""The streaming, resumable training loader: each rank reads its own runs of the latent cache.

Input: latent index Parquet files (:mod:`components.latents`; one per group and resolution) whose
rows name a latent (``file`` + ``key``), its bucket (``height`` / ``width``) and the image's
``captions`` / ``domain``. Rows are filtered to the stage (resolution, VAE fingerprint and, when
the index has tier columns, the stage's tier) by :func:`stage_rows`.

- **Units.** Each index file's stage rows are cut into *units* of at most ``unit_size`` samples
  (:func:`plan_units`; only the filter columns are read). A unit is the unit of work and of memory:
  a worker reads one unit's latents, nothing more.
- **Order.** Epoch ``e`` shuffles the units with the seed; rank ``r`` of ``w`` takes every ``w``-th
  one (:func:`rank_units`). Inside a unit the samples are shuffled, grouped by aspect-ratio bucket
  and cut into micro batches of one bucket each (the last batch of a bucket is filled up from the
  same bucket), and the batches are shuffled (:func:`unit_batches`). Everything is a function of
  (seed, epoch, unit), so any number of loader workers gives the same stream.
- **Position.** ``(epoch, unit cursor, batches taken from that unit)`` per rank
  (:class:`Position`), saved in every checkpoint; a resumed run continues the stream exactly.
- **Memory.** A ``torch.utils.data.DataLoader`` with ``workers`` processes reads units ahead
  (``prefetch`` per worker), so at most ``workers * prefetch + 1`` units are held, whatever the
  dataset size; the plan itself is three integers per unit.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import ConfigError
from components.latents.cache import (
    INDEX_COLUMNS,
    OPTIONAL_SAMPLE_COLUMNS,
    SAMPLE_COLUMNS,
    TIER_COLUMNS,
    LatentStore,
    index_files,
    read_index_columns,
)
from components.train.checkpoints import write_atomic
from components.train.data import TrainRecord, parse_captions

log = logging.getLogger(__name__)

LOADER_STATE = "loader.json"  # in a checkpoint's tag folder: every rank's Position


@dataclass(frozen=True)
class StageFilter:
    """Which index rows a stage trains on."""

    resolution: int
    vae_fingerprint: str
    stage: str | None = None  # tier flag column to require (when the index has it)


@dataclass(frozen=True)
class Unit:
    """``count`` stage rows of one index file, from stage row ``start`` on."""

    file: int  # position in the plan's file list
    start: int
    count: int


@dataclass(frozen=True)
class Position:
    """Where a rank's stream stands: epoch, cursor into the rank's units of that epoch, and how
    many batches of the unit at the cursor were already taken."""

    epoch: int = 0
    cursor: int = 0
    batch: int = 0


@dataclass
class LatentBatch:
    """One micro batch: same-bucket latents (fp32, ``(B, C, h, w)``) and their records."""

    latents: torch.Tensor
    records: list[TrainRecord]


@dataclass
class UnitData:
    """What a worker returns for one unit: its place in the stream and its batches."""

    epoch: int
    cursor: int
    batches: list[LatentBatch]


def stage_rows(uri: str, flt: StageFilter, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of one index file the stage trains on, in file order (``columns``: read only these
    besides the filter columns)."""
    wanted = None
    if columns is not None:
        wanted = list(dict.fromkeys([*columns, "resolution", "vae_fingerprint", *TIER_COLUMNS]))
    frame = read_index_columns(uri, wanted)
    missing = [c for c in ("resolution", "vae_fingerprint") if c not in frame.columns]
    if missing:
        raise ConfigError(f"latent index {uri} lacks columns: {', '.join(missing)}")
    keep = (frame["resolution"] == flt.resolution) & (frame["vae_fingerprint"] == flt.vae_fingerprint)
    if flt.stage is not None and flt.stage in frame.columns:
        keep &= frame[flt.stage].fillna(False).astype(bool)
    elif flt.stage is not None and any(c in frame.columns for c in TIER_COLUMNS):
        keep &= False  # a tiered index without this stage's flag (e.g. no grids: no unified rows)
    return frame[keep].reset_index(drop=True)


def plan_units(files: Sequence[str], flt: StageFilter, unit_size: int) -> list[Unit]:
    """Cut every file's stage rows into units of at most ``unit_size`` (filter columns read only)."""
    if unit_size < 1:
        raise ConfigError(f"loader unit size must be >= 1 (got {unit_size})")
    units = []
    for code, uri in enumerate(files):
        n = len(stage_rows(uri, flt, columns=()))
        units += [Unit(code, start, min(unit_size, n - start)) for start in range(0, n, unit_size)]
    return units


def rank_units(n_units: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """The units rank ``rank`` reads in ``epoch``: every ``world``-th of the epoch's shuffled order
    (with fewer units than ranks, a rank reads the unit at its place modulo the count)."""
    if n_units < 1:
        raise ConfigError("the stage has no training samples (no latents match its resolution, VAE and tier)")
    order = np.random.default_rng([seed, epoch]).permutation(n_units)
    return [int(order[i % n_units]) for i in range(rank, max(n_units, world), world)]


def unit_batches(
    sizes: Sequence[tuple[int, int]], seed: int, epoch: int, unit: int, micro_batch: int
) -> list[list[int]]:
    """Micro batches (positions into the unit) of one bucket each: shuffled, grouped by bucket,
    the last batch of each bucket filled up from the same bucket, then the batches shuffled."""
    rng = np.random.default_rng([seed, epoch, unit, 1])
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for pos in rng.permutation(len(sizes)):
        by_bucket.setdefault(tuple(sizes[pos]), []).append(int(pos))
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        filled = [members[i % len(members)] for i in range(-(-len(members) // micro_batch) * micro_batch)]
        batches += [filled[i : i + micro_batch] for i in range(0, len(filled), micro_batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sample_record(row: dict) -> TrainRecord:
    captions = parse_captions(row["captions"])
    fill = row.get("grid_fill")
    return TrainRecord(str(row["id"]), None, str(row.get("domain") or "real"), captions,
                       height=int(row["height"]), width=int(row["width"]),
                       grid_fill=fill if isinstance(fill, str) and fill else None)  # fmt: skip


class UnitDataset(Dataset):
    """Reads units: ``dataset[(epoch, cursor, unit)]`` → :class:`UnitData` (run in loader workers)."""

    def __init__(
        self,
        files: Sequence[str],
        units: Sequence[Unit],
        flt: StageFilter,
        *,
        seed: int,
        micro_batch: int,
    ) -> None:
        self.files, self.units, self.flt = list(files), list(units), flt
        self.seed, self.micro_batch = seed, micro_batch
        self._frames: OrderedDict[int, pd.DataFrame] = OrderedDict()  # the last few index files read

    def __len__(self) -> int:
        return len(self.units)

    def _frame(self, code: int) -> pd.DataFrame:
        if code not in self._frames:
            columns = [*INDEX_COLUMNS, *SAMPLE_COLUMNS, *OPTIONAL_SAMPLE_COLUMNS]
            self._frames[code] = stage_rows(self.files[code], self.flt, columns)
            while len(self._frames) > 2:
                self._frames.popitem(last=False)
        return self._frames[code]

    def __getitem__(self, key: tuple[int, int, int]) -> UnitData:
        epoch, cursor, index = key
        unit = self.units[index]
        rows = self._frame(unit.file).iloc[unit.start : unit.start + unit.count]
        missing = [c for c in SAMPLE_COLUMNS if c not in rows.columns]
        if missing:
            raise ConfigError(f"latent index {self.files[unit.file]} lacks columns: {', '.join(missing)}")
        records = [sample_record(r) for r in rows.to_dict("records")]
        latents = LatentStore(rows, max_open=1).read_many([r.id for r in records])  # s3: one range read
        sizes = list(zip(rows["height"].astype(int), rows["width"].astype(int), strict=True))
        batches = []
        for positions in unit_batches(sizes, self.seed, epoch, index, self.micro_batch):
            chosen = [records[p] for p in positions]
            batches.append(LatentBatch(torch.stack([latents[p] for p in positions]), chosen))
        return UnitData(epoch, cursor, batches)


class RankSampler(Sampler):
    """``(epoch, cursor, unit)`` keys of one rank's units, from a position on, epoch after epoch."""

    def __init__(self, n_units: int, *, seed: int, rank: int, world: int, start: Position) -> None:
        self.n_units, self.seed, self.rank, self.world, self.start = n_units, seed, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, cursor = self.start.epoch, self.start.cursor
        while True:
            mine = rank_units(self.n_units, epoch, self.seed, self.rank, self.world)
            for i in range(cursor, len(mine)):
                yield epoch, i, mine[i]
            epoch, cursor = epoch + 1, 0


def _keep(item: UnitData) -> UnitData:
    return item


class StageStream:
    """One rank's endless stream of micro batches, resumable from a :class:`Position`."""

    def __init__(
        self,
        index: str | Path | Sequence[str],
        flt: StageFilter,
        *,
        micro_batch: int,
        seed: int,
        rank: int,
        world: int,
        unit_size: int = 256,
        workers: int = 1,
        prefetch: int = 2,
        start: Position | None = None,
    ) -> None:
        self.files = index_files(index) if isinstance(index, str | Path) else list(index)
        self.units = plan_units(self.files, flt, unit_size)
        self.n_samples = sum(u.count for u in self.units)
        rank_units(len(self.units), 0, seed, rank, world)  # an empty stage fails here, with one line
        self.start = start or Position()
        dataset = UnitDataset(self.files, self.units, flt, seed=seed, micro_batch=micro_batch)
        sampler = RankSampler(len(self.units), seed=seed, rank=rank, world=world, start=self.start)
        self._loader = DataLoader(
            dataset, batch_size=None, sampler=sampler, collate_fn=_keep, num_workers=workers,
            prefetch_factor=prefetch if workers else None, pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
        self._iter: Iterator[UnitData] | None = None
        self._unit: UnitData | None = None
        self._taken = 0

    @property
    def position(self) -> Position:
        """Where the next batch comes from (what a checkpoint saves)."""
        if self._unit is None:
            return self.start
        return Position(self._unit.epoch, self._unit.cursor, self._taken)

    def next(self) -> LatentBatch:
        """The next micro batch."""
        if self._iter is None:
            self._iter = iter(self._loader)
        while self._unit is None or self._taken >= len(self._unit.batches):
            first = self._unit is None
            self._unit = next(self._iter)
            self._taken = self.start.batch if first else 0
        batch = self._unit.batches[self._taken]
        self._taken += 1
        return batch

    def close(self) -> None:
        """Stop the loader workers."""
        self._iter = None


def save_positions(path: Path, positions: Sequence[Position]) -> None:
    """Every rank's position (rank order) as JSON, written atomically (whole or absent)."""
    state = {"world_size": len(positions), "positions": [asdict(p) for p in positions]}
    write_atomic(path, json.dumps(state))


def load_position(path: Path, rank: int, world: int) -> Position | None:
    """This rank's saved position; None (with a warning: the data order restarts at the next
    epoch) when the checkpoint has none or was written by another number of ranks."""
    if not path.is_file():
        log.warning("checkpoint %s has no loader position; the data stream starts over", path.parent)
        return None
    state = json.loads(path.read_text())
    positions = [Position(**p) for p in state["positions"]]
    if int(state["world_size"]) != world:
        epoch = max(p.epoch for p in positions) + 1
        log.warning(
            "checkpoint %s was written by %d ranks, this run has %d: the data stream restarts at epoch %d",
            path.parent, state["world_size"], world, epoch,
        )  # fmt: skip
        return Position(epoch)
    return positions[rank]
