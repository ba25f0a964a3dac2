"""The streaming training loader: units, per-rank order, buckets, positions, workers."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from common.errors import ConfigError
from components.train.loader import (
    Position,
    StageFilter,
    StageStream,
    load_position,
    plan_units,
    rank_units,
    save_positions,
    unit_batches,
)
from components.train.sources import usable_index

FP = "vaefp"
SIZES = [(64, 64), (64, 128), (128, 64)]  # (height, width) buckets at 64px-ish


def write_index(
    root: Path, name: str, n: int, *, resolution: int = 64, hq_every: int = 0, start: int = 0
) -> str:
    """``n`` samples in one safetensors file and its index (captions, domain, tier flags); each
    latent is filled with its number so a test can tell which sample it got."""
    root.mkdir(parents=True, exist_ok=True)
    tensors, rows = {}, []
    for i in range(start, start + n):
        h, w = SIZES[i % len(SIZES)]
        key = f"im{i:05d}"
        tensors[key] = torch.full((4, h // 8, w // 8), float(i), dtype=torch.bfloat16)
        caps = [{"granularity": "short", "language": "en", "text": f"image {i}"}]
        file = str(root / f"{name}.safetensors")
        rows.append(
            {"id": key, "file": file, "key": key, "height": h, "width": w, "resolution": resolution,
             "vae_fingerprint": FP, "captions": json.dumps(caps), "domain": "synthetic", "lowres": True,
             "highres": True, "hq": bool(hq_every) and i % hq_every == 0}
        )  # fmt: skip
    save_file(tensors, str(root / f"{name}.safetensors"))
    uri = root / f"{name}.index.parquet"
    pd.DataFrame(rows).to_parquet(uri)
    return str(uri)


@pytest.fixture
def index(tmp_path) -> Path:
    write_index(tmp_path / "idx", "g0", 37, hq_every=4)
    write_index(tmp_path / "idx", "g1", 20, hq_every=4, start=37)
    return tmp_path / "idx"


def ids_of(batch) -> list[str]:
    return [r.id for r in batch.records]


def stream(index, tmp_path, **kwargs) -> StageStream:
    options = {"micro_batch": 3, "seed": 7, "rank": 0, "world": 1, "unit_size": 8, "workers": 0}
    return StageStream(index, StageFilter(64, FP, "lowres"), **{**options, **kwargs})


def test_units_cover_the_files_and_ranks_split_each_epoch(index):
    files = sorted(str(p) for p in index.glob("*.parquet"))
    units = plan_units(files, StageFilter(64, FP), 8)
    assert [u.count for u in units] == [8, 8, 8, 8, 5, 8, 8, 4]  # 37 + 20 samples
    for epoch in range(3):
        per_rank = [rank_units(len(units), epoch, 0, r, 3) for r in range(3)]
        assert sorted(u for mine in per_rank for u in mine) == list(range(len(units)))
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert rank_units(8, 0, 0, 0, 1) != rank_units(8, 1, 0, 0, 1)  # a new order every epoch
    assert rank_units(8, 1, 0, 0, 1) == rank_units(8, 1, 0, 0, 1)
    assert rank_units(2, 0, 0, 3, 4) in ([0], [1])  # fewer units than ranks: every rank reads one
    with pytest.raises(ConfigError, match="no training samples"):
        rank_units(0, 0, 0, 0, 1)


def test_batches_hold_one_bucket_and_every_sample(tmp_path):
    sizes = [SIZES[i % 3] for i in range(10)] + [SIZES[0]] * 3
    batches = unit_batches(sizes, seed=1, epoch=0, unit=5, micro_batch=4)
    assert all(len(b) == 4 and len({sizes[p] for p in b}) == 1 for b in batches)
    assert {p for b in batches for p in b} == set(range(len(sizes)))
    assert batches == unit_batches(sizes, seed=1, epoch=0, unit=5, micro_batch=4)
    assert batches != unit_batches(sizes, seed=1, epoch=1, unit=5, micro_batch=4)


def test_an_epoch_sees_every_sample_with_its_own_latent(index, tmp_path):
    s = stream(index, tmp_path)
    seen = []
    while True:
        batch = s.next()
        if s.position.epoch > 0:
            break
        assert batch.latents.dtype == torch.float32 and len(batch.records) == 3
        assert len({tuple(t.shape) for t in batch.latents}) == 1  # one bucket per batch
        for rec, latent in zip(batch.records, batch.latents, strict=True):
            assert latent.flatten()[0].item() == int(rec.id[2:])  # the sample's own latent
            assert rec.captions[0].text == f"image {int(rec.id[2:])}" and rec.domain == "synthetic"
        seen += ids_of(batch)
    assert {f"im{i:05d}" for i in range(57)} == set(seen)


def test_the_stage_tier_filters_rows(index, tmp_path):
    hq = StageStream(index, StageFilter(64, FP, "hq"), micro_batch=2, seed=0, rank=0, world=1)
    assert hq.n_samples == len([i for i in range(57) if i % 4 == 0])
    assert all(int(r.id[2:]) % 4 == 0 for _ in range(10) for r in hq.next().records)


def test_resuming_from_a_position_continues_the_stream(index, tmp_path):
    straight = stream(index, tmp_path, world=2, rank=1)
    want = [ids_of(straight.next()) for _ in range(30)]
    first = stream(index, tmp_path, world=2, rank=1)
    got = [ids_of(first.next()) for _ in range(11)]
    position = first.position
    assert position != Position()  # mid-epoch, mid-unit
    resumed = stream(index, tmp_path, world=2, rank=1, start=position)
    got += [ids_of(resumed.next()) for _ in range(19)]
    assert got == want


def test_worker_processes_give_the_same_stream(index, tmp_path):
    in_step = stream(index, tmp_path)
    workers = stream(index, tmp_path, workers=2, prefetch=1)
    for _ in range(25):
        a, b = in_step.next(), workers.next()
        assert ids_of(a) == ids_of(b) and torch.equal(a.latents, b.latents)
    workers.close()


def test_positions_round_trip_and_a_new_world_size_restarts_the_epoch(tmp_path, caplog):
    path = tmp_path / "loader.json"
    save_positions(path, [Position(2, 3, 1), Position(2, 4, 0)])
    assert load_position(path, 1, 2) == Position(2, 4, 0)
    with caplog.at_level(logging.WARNING):
        assert load_position(path, 0, 4) == Position(3)
        assert load_position(tmp_path / "none.json", 0, 1) is None
    assert "written by 2 ranks, this run has 4" in caplog.text and "starts over" in caplog.text


def test_usable_index_needs_this_resolution_vae_and_captions(index, tmp_path, caplog):
    assert usable_index(index, StageFilter(64, FP)) is not None
    with caplog.at_level(logging.WARNING):
        assert usable_index(index, StageFilter(128, FP)) is None
        assert usable_index(index, StageFilter(64, "other")) is None
    assert "no latents at 128px (it has: 64)" in caplog.text
    assert f"built with VAE fingerprint {FP}, this stage's VAE is other" in caplog.text
    old = pd.read_parquet(index / "g0.index.parquet").drop(columns=["captions", "domain"])
    old.to_parquet(index / "g0.index.parquet")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert usable_index(index, StageFilter(64, FP)) is None
    assert "no caption columns" in caplog.text


def test_bad_index_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no latent index"):
        StageStream(tmp_path, StageFilter(64, FP), micro_batch=1, seed=0, rank=0, world=1)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read latent index"):
        StageStream(tmp_path, StageFilter(64, FP), micro_batch=1, seed=0, rank=0, world=1)
    (tmp_path / "bad.parquet").unlink()
    write_index(tmp_path, "g", 3)
    with pytest.raises(ConfigError, match="no training samples"):
        StageStream(tmp_path, StageFilter(256, FP), micro_batch=1, seed=0, rank=0, world=1)
