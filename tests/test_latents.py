"""The latent cache (:mod:`components.latents`): bf16 safetensors groups built from shards, read
back lazily by id, and used by training's feature cache in place of encoding."""

from __future__ import annotations

import io
import json
import logging

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import components.latents.cache as latent_cache
from common.errors import ConfigError
from components.latents import (
    INDEX_COLUMNS,
    SAMPLE_COLUMNS,
    LatentStore,
    build_latents,
    latent_file,
    latent_index_path,
    read_latent_index,
    write_latent_index,
)
from components.train.data import bucket_sizes, fingerprint, load_image, nearest_bucket
from components.train.loader import StageFilter, StageStream
from components.train.sources import usable_index
from model.vae import encode_pixels
from storage.shards import ShardWriter, image_bytes

RES = 128
SIZES = [(64, 64), (96, 64), (64, 128), (80, 80), (128, 64), (64, 64), (96, 64)]  # (w, h)


def png(i: int, size: tuple[int, int]) -> bytes:
    img = Image.new("RGB", size, (240, 240 - 20 * i, 30 * i))
    ImageDraw.Draw(img).ellipse((4 + i, 6, size[0] // 2 + i, size[1] - 6), fill=(20 * i, 90, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def shard_rows(prefix: str, sizes=SIZES, with_dims: bool = True) -> pd.DataFrame:
    """Images in tar shards (3 per shard) and their manifest rows (shard refs, captions)."""
    writer = ShardWriter(prefix, "img", max_members=3)
    refs = []
    for i, size in enumerate(sizes):
        writer.add(f"im{i:02d}.png", png(i, size))
        if writer.full:
            refs += writer.flush()
    refs += writer.flush()
    caps = [{"granularity": "short", "language": "en", "text": "a blue ellipse"}]
    rows = [
        {
            "id": f"im{i:02d}",
            "image_path": None,
            "domain": "real",
            "captions": json.dumps(caps),
            **ref.as_row(),
        }
        for i, ref in enumerate(refs)
    ]
    frame = pd.DataFrame(rows)
    if with_dims:
        frame["width"], frame["height"] = [w for w, _ in sizes], [h for _, h in sizes]
    return frame


def encode_direct(vae, row: dict) -> torch.Tensor:
    size = nearest_bucket(*Image.open(io.BytesIO(image_bytes(row))).size, bucket_sizes(RES))
    return encode_pixels(vae, load_image(image_bytes(row), size)[None])[0]


@pytest.fixture
def built(tmp_path, tiny_pipe):
    """A sharded manifest and latents for all but its last image, in two groups with indexes."""
    rows = shard_rows(str(tmp_path / "shards"))
    manifest = tmp_path / "train.parquet"
    rows.to_parquet(manifest)
    out = str(tmp_path / "latents")
    fp = fingerprint(tiny_pipe.vae)
    frames = []
    for name, group in (("g0", rows.iloc[:4]), ("g1", rows.iloc[4:6])):
        frames.append(build_latents(group, vae=tiny_pipe.vae, resolution=RES, out_prefix=out, name=name,
                                    batch_size=2))  # fmt: skip
        write_latent_index(frames[-1], latent_index_path(out, RES, fp, name))
    return rows, manifest, out, fp, frames


def test_build_latents_writes_one_bf16_safetensors_file_keyed_by_id(built, tiny_pipe):
    rows, _, out, fp, (g0, g1) = built
    assert list(g0.columns) == [*INDEX_COLUMNS, *SAMPLE_COLUMNS] and len(g0) == 4 and len(g1) == 2
    path = latent_file(out, RES, fp, "g0")
    assert path.endswith(f"latents-r{RES}-{fp}/g0.safetensors") and set(g0["file"]) == {path}
    assert (g0["resolution"] == RES).all() and (g0["vae_fingerprint"] == fp).all()
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(rows["id"][:4]) == sorted(g0["key"])
        assert f.metadata()["vae_fingerprint"] == fp
        for row in g0.itertuples():
            t = f.get_tensor(row.key)
            assert t.dtype == torch.bfloat16 and t.shape == (16, row.height // 8, row.width // 8)
            w, h = rows.set_index("id").loc[row.id, ["width", "height"]]
            assert (row.height, row.width) == nearest_bucket(w, h, bucket_sizes(RES))
    assert {(h, w) for h, w in zip(g0["height"], g0["width"], strict=True)} == {
        (128, 128),
        (64, 128),
        (128, 64),
    }


def test_store_serves_what_direct_encoding_gives(built, tiny_pipe):
    rows, _, out, _, frames = built
    store = LatentStore(pd.concat(frames))
    assert len(store) == 6 and "im06" not in store and "im00" in store
    for row in rows.iloc[:6].to_dict("records"):
        got, want = store[row["id"]], encode_direct(tiny_pipe.vae, row)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
        assert store.bucket(row["id"]) == (want.shape[-2] * 8, want.shape[-1] * 8)
    with pytest.raises(KeyError):
        store["im06"]
    assert len(LatentStore.from_index(out)) == 6  # a folder of index Parquets


def test_dims_are_measured_when_the_manifest_has_none(tmp_path, tiny_pipe):
    rows = shard_rows(str(tmp_path / "shards"), with_dims=False)
    index = build_latents(rows, vae=tiny_pipe.vae, resolution=RES, out_prefix=str(tmp_path), name="x")
    want = {f"im{i:02d}": nearest_bucket(w, h, bucket_sizes(RES)) for i, (w, h) in enumerate(SIZES)}
    assert {r.id: (r.height, r.width) for r in index.itertuples()} == want


def test_unreadable_images_are_left_out_with_a_warning(tmp_path, tiny_pipe, caplog):
    rows = shard_rows(str(tmp_path / "shards"))
    rows.loc[1, "size"] = rows.loc[1, "size"] + 10**6  # past the end of its shard
    rows.loc[2, "offset"] = 0  # the tar header: not an image
    with caplog.at_level(logging.WARNING):
        index = build_latents(rows, vae=tiny_pipe.vae, resolution=RES, out_prefix=str(tmp_path), name="x")
    assert "im01" not in set(index["id"]) and "im02" not in set(index["id"]) and len(index) == 5
    assert "im01 left out" in caplog.text and "im02 left out" in caplog.text


def test_the_training_stream_serves_the_indexed_latents(built, tiny_pipe, tmp_path):
    _, _, out, fp, frames = built
    store = LatentStore(pd.concat(frames))
    stream = StageStream(out, StageFilter(RES, fp, "highres"), micro_batch=2, seed=0, rank=0, world=1,
                         workers=0)  # fmt: skip
    assert stream.n_samples == 6 and usable_index(out, StageFilter(RES, fp)) is not None
    seen = set()
    for _ in range(6):
        batch = stream.next()
        for rec, latent in zip(batch.records, batch.latents, strict=True):
            assert torch.equal(latent, store[rec.id]) and rec.captions[0].text == "a blue ellipse"
            seen.add(rec.id)
    assert seen == set(store)


def test_bad_index_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no latent index"):
        read_latent_index(tmp_path)
    pd.DataFrame({"id": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="lacks columns: file, key, height"):
        read_latent_index(tmp_path)


def test_s3_latents_are_read_by_ranges_a_run_of_ids_at_once(s3, tmp_path, tiny_pipe):
    rows = shard_rows("s3://lumina/shards", SIZES[:4])
    out = "s3://lumina/cache"
    index = build_latents(rows, vae=tiny_pipe.vae, resolution=RES, out_prefix=out, name="g0", batch_size=3)
    fp = fingerprint(tiny_pipe.vae)
    assert set(index["file"]) == {f"{out}/latents-r{RES}-{fp}/g0.safetensors"}
    assert list(index["key"]) == sorted(index["key"])  # the file's tensor order
    write_latent_index(index, latent_index_path(out, RES, fp, "g0"))
    store = LatentStore.from_index(f"{out}/latents-r{RES}-{fp}/")
    for row in rows.to_dict("records"):
        want = encode_direct(tiny_pipe.vae, row)
        torch.testing.assert_close(store[row["id"]], want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    assert store.range_reads == len(rows)  # one small read per id, nothing downloaded whole
    fresh = LatentStore(index)
    together = fresh.read_many(list(index["id"]))  # a loader unit: one read for the whole run
    assert fresh.range_reads == 1
    assert all(torch.equal(t, store[i]) for i, t in zip(index["id"], together, strict=True))
    assert not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.slow
def test_a_stage_trains_from_the_latent_store(built, tmp_path, monkeypatch):
    from components.train.config import stage_config
    from components.train.trainer import train_stage

    rows, manifest, out, _, _ = built
    rows.iloc[:6].to_parquet(manifest)  # every image has stored latents
    cfg = stage_config("highres", manifest=manifest, output_dir=tmp_path / "run", steps=2, global_batch=2,
                       micro_batch=2, track=False, latents=out)  # fmt: skip

    def no_encoding(*_):
        raise AssertionError("a latent was encoded although the store holds it")

    monkeypatch.setattr(latent_cache, "encode_pixels", no_encoding)
    result = train_stage(cfg)
    assert len(result.losses) == 2 and all(loss == loss for loss in result.losses)
