import csv
import hashlib
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from common.errors import ConfigError
from components.ingest import ingest as ingest_module
from components.ingest.gate import GateFailed, run_gate
from components.ingest.ingest import (
    IngestOptions,
    Item,
    NearDuplicateIndex,
    color_signature,
    decode_stream,
    dhash,
    hamming,
    ingest,
    same_colors,
)
from storage.shards import read_member


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A distinct smooth random image per seed (coarse noise, upsampled)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return coarse.resize((w, h), Image.BICUBIC)


def _png_bomb(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (patched IHDR with a valid CRC)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture
def odd_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo(120, 80, 1).save(src / "good.jpg", quality=90)
    (src / "good.txt").write_text("a gradient photo")
    full = io.BytesIO()
    _photo(100, 100, 2).save(full, "JPEG")
    (src / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.jpg").write_text("this is not an image")
    _photo(90, 70, 3).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 10).astype(np.uint16)).save(src / "deep16.png")
    pal = _photo(80, 80, 4).convert("P")
    pal.info["transparency"] = 0
    pal.save(src / "palette.png", transparency=0)
    frames = [_photo(64, 64, s) for s in (5, 6)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rotated = _photo(100, 60, 7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated.save(src / "rotated.jpg", exif=exif)
    (src / "bomb.png").write_bytes(_png_bomb(10_000, 10_000))
    _photo(400, 40, 8).save(src / "strip.png")
    _photo(20, 20, 9).save(src / "tiny.png")
    return src


def read_rejects(path) -> dict[str, str]:
    with open(path) as fh:
        return {row["source"].rsplit("/", 1)[-1]: row["reason"] for row in csv.DictReader(fh)}


def test_broken_and_odd_files_are_kept_or_reported(odd_folder, tmp_path):
    result = ingest(odd_folder, tmp_path / "out", IngestOptions(max_pixels=20_000_000))
    manifest = pd.read_parquet(result.manifest)
    kept = {p.rsplit("/", 1)[-1]: row for p, row in zip(manifest["source_path"], manifest.to_dict("records"),
                                                          strict=True)}  # fmt: skip
    rejects = read_rejects(result.rejects)
    assert set(kept) == {"good.jpg", "cmyk.jpg", "deep16.png", "palette.png", "anim.gif", "rotated.jpg"}
    assert (kept["good.jpg"]["width"], kept["good.jpg"]["height"]) == (120, 80)
    assert (kept["rotated.jpg"]["width"], kept["rotated.jpg"]["height"]) == (60, 100)  # EXIF applied
    assert kept["cmyk.jpg"]["mode"] == "CMYK" and kept["deep16.png"]["mode"].startswith("I")
    assert kept["good.jpg"]["caption"] == "a gradient photo"
    assert rejects["empty.png"] == "zero_bytes"
    assert rejects["notes.jpg"] == "not_an_image"
    assert rejects["truncated.jpg"].startswith("corrupt")
    assert rejects["bomb.png"] == "decompression_bomb"
    assert rejects["strip.png"].startswith("bad_aspect")
    assert rejects["tiny.png"].startswith("too_small")
    assert result.kept + result.rejected == len(list(odd_folder.glob("*.*"))) - 1  # minus the caption .txt
    for row in kept.values():  # the original bytes, stored in a tar shard, read back by range
        assert hashlib.sha256(read_member(row)).hexdigest() == row["sha256"]
        assert tarfile.is_tarfile(row["shard"])


def test_near_duplicates_and_resume(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    base = _photo(128, 96, 11)
    base.save(src / "a.png")
    Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + 6, 0, 255).astype(np.uint8)).save(
        src / "b.png"
    )
    _photo(128, 96, 12).transpose(Image.FLIP_LEFT_RIGHT).save(src / "c.png")
    first = ingest(src, tmp_path / "out")
    rejects = read_rejects(first.rejects)
    assert first.kept == 2 and rejects["b.png"].startswith("near_duplicate_of:")
    assert hamming(dhash(base), dhash(Image.open(src / "b.png"))) <= 4
    again = ingest(src, tmp_path / "out")
    assert again.kept == 2 and again.dataset_hash == first.dataset_hash
    _photo(64, 64, 13).save(src / "d.png")
    grown = ingest(src, tmp_path / "out")
    assert grown.kept == 3 and grown.dataset_hash != first.dataset_hash


def test_tar_shards_with_captions(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, seed in (("0001", 21), ("0002", 22)):
            buf = io.BytesIO()
            _photo(80, 64, seed).save(buf, "PNG")
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = ingest(shard, tmp_path / "out")
    manifest = pd.read_parquet(result.manifest)
    assert sorted(manifest["caption"]) == ["caption 0001", "caption 0002"]
    with pytest.raises(ConfigError, match="ingest source not found"):
        ingest(tmp_path / "missing", tmp_path / "out2")


def test_broken_json_sidecar_gives_no_caption_and_unreadable_keeps_its_reason(tmp_path, monkeypatch):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        buf = io.BytesIO()
        _photo(80, 64, 31).save(buf, "PNG")
        for name, data in (("k.png", buf.getvalue()), ("k.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = pd.read_parquet(ingest(shard, tmp_path / "out").manifest)
    assert len(manifest) == 1 and manifest["caption"].isna().all()

    # a decoder crashing on a malformed file (PIL plugins raise struct.error, IndexError...) is a reject
    def crashing(item, max_pixels):
        raise IndexError("tile index out of range")

    monkeypatch.setattr(ingest_module, "decode", crashing)
    [(_, crashed)] = list(decode_stream([Item("x.tif", b"II*\x00")], IngestOptions()))
    assert crashed == "decode_error: IndexError: tile index out of range"
    # a file that could not be read is rejected with why, whatever caption sat beside it
    unreadable = Item("s3://b/k.png", b"", caption="a caption", error="unreadable: AccessDenied")
    [(item, reason)] = list(decode_stream([unreadable], IngestOptions()))
    assert item is unreadable and reason == "unreadable: AccessDenied"


def _flat_shape(shape: str, fill: str = "#1f4fd8") -> Image.Image:
    """One flat shape on the right of a light 128 px canvas, as the synthetic scenes draw them."""
    image = Image.new("RGB", (128, 128), "#f0f0ea")
    box = (78, 46, 114, 82)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.ellipse(box, fill=fill)
    return image


def test_flat_shapes_of_one_colour_are_not_near_duplicates(tmp_path):
    square, circle = _flat_shape("square"), _flat_shape("circle")
    # what made them "duplicates" before: the same dHash and the same 8 x 8 colour layout
    assert hamming(dhash(square), dhash(circle)) <= 4
    coarse = [bytes.fromhex(color_signature(im, grid=8)) for im in (square, circle)]
    assert same_colors(*coarse)
    src = tmp_path / "src"
    src.mkdir()
    square.save(src / "square.png")
    circle.save(src / "circle.png")
    copy = np.clip(np.asarray(square, dtype=np.int16) - 5, 0, 255).astype(np.uint8)
    Image.fromarray(copy).save(src / "square_darker.png")  # still a near duplicate
    result = ingest(src, tmp_path / "out")
    rejects = read_rejects(result.rejects)
    assert result.kept == 2 and set(rejects) == {"square_darker.png"}
    manifest = pd.read_parquet(result.manifest)
    square_id = manifest.loc[manifest["source_path"].str.endswith("/square.png"), "id"].item()
    assert rejects["square_darker.png"] == f"near_duplicate_of:{square_id}"
    # a signature in another layout (a manifest from before) leaves the decision to the hash
    old = "00" * 192
    assert same_colors(bytes.fromhex(old), bytes.fromhex(color_signature(square)))
    with pytest.raises(ValueError, match="levels"):
        color_signature(square, levels=32)


def test_near_duplicate_index_finds_what_a_full_scan_finds():
    rng = np.random.default_rng(0)
    base = [int(v) for v in rng.integers(0, 2**63, 200, dtype=np.int64)]

    # near copies: flip 0..6 random bits of some of them
    def flip(h: int) -> int:
        return h ^ sum(1 << int(bit) for bit in rng.choice(64, int(rng.integers(0, 7)), replace=False))

    queries = [flip(b) for b in base[:100]] + [int(v) for v in rng.integers(0, 2**63, 100, dtype=np.int64)]
    sig, other_sig = "00" * 8, "07" * 8
    for distance in (0, 1, 4, 8):
        index = NearDuplicateIndex(distance)
        for i, h in enumerate(base):
            index.add(h, sig, f"id{i}")
        for q in queries:
            scan = next((f"id{i}" for i, h in enumerate(base) if hamming(h, q) <= distance), None)
            assert index.find(q, sig) == scan
        assert index.find(base[0], other_sig) is None  # the colour layout must match too
    off = NearDuplicateIndex(-1)
    off.add(base[0], sig, "id0")
    assert off.find(base[0], sig) is None


def test_decoding_streams_with_bounded_read_ahead():
    read = 0

    def items():
        nonlocal read
        for i in range(50):
            read += 1
            buf = io.BytesIO()
            _photo(40, 40, i).save(buf, "PNG")
            yield Item(f"mem/{i}.png", buf.getvalue())

    opts = IngestOptions(workers=2, in_flight=4)
    seen = 0
    for item, result in decode_stream(items(), opts):
        assert item.source == f"mem/{seen}.png" and result.width == 40  # in source order
        seen += 1
        assert read - seen <= opts.in_flight  # never more than in_flight files held
    assert seen == read == 50


def test_interrupted_ingest_keeps_checkpointed_work_and_resumes_without_rereading(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        _photo(64, 48, 100 + i).save(src / f"img{i:02d}.png")
    real_decode = ingest_module.decode
    calls = []

    def failing_decode(item, max_pixels):
        calls.append(item.source)
        if len(calls) == 9:
            raise KeyboardInterrupt  # the process is stopped mid-run
        return real_decode(item, max_pixels)

    opts = IngestOptions(workers=1, in_flight=1, shard_size=4)
    straight = ingest(src, tmp_path / "straight", opts)
    monkeypatch.setattr(ingest_module, "decode", failing_decode)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, tmp_path / "resumed", opts)
    assert not (tmp_path / "resumed" / "manifest.parquet").exists()
    parts = sorted((tmp_path / "resumed").glob("ingest-*/groups/g00000/parts/rows-*.parquet"))
    saved = pd.concat([pd.read_parquet(p) for p in parts])
    assert len(parts) == 2 and len(saved) == 8  # two closed shards of 4; the image in flight is redone
    assert len(list((tmp_path / "resumed").glob("ingest-*/groups/g00000/shards/*.tar"))) == 2

    calls.clear()

    def counting_decode(item, max_pixels):
        calls.append(item.source)
        return real_decode(item, max_pixels)

    monkeypatch.setattr(ingest_module, "decode", counting_decode)
    resumed = ingest(src, tmp_path / "resumed", opts)
    assert len(calls) == 4 and not set(calls) & set(saved["source_path"])  # saved images not read again
    assert resumed.kept == straight.kept == 12 and resumed.dataset_hash == straight.dataset_hash


def test_caption_sidecar_tables(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    _photo(64, 64, 41).save(src / "a.png")
    (src / "a.txt").write_text("caption beside the file")
    _photo(64, 64, 42).save(src / "sub" / "b.jpg")
    _photo(64, 64, 43).save(src / "c.png")
    pd.DataFrame(
        {
            "file": ["a.png", "sub/b", "./nowhere.png", "c.png"],
            "alt_text": ["sidecar a", "sidecar b", "x", ""],
        }
    ).to_csv(tmp_path / "alt.csv", index=False)
    result = ingest(src, tmp_path / "out", captions=tmp_path / "alt.csv")
    captions = {
        p.rsplit("/", 1)[-1]: c
        for p, c in pd.read_parquet(result.manifest)[["source_path", "caption"]].values
    }
    assert captions["a.png"] == "sidecar a" and captions["b.jpg"] == "sidecar b"  # the sidecar wins
    assert pd.isna(captions["c.png"])  # a blank sidecar caption gives none
    assert result.sidecar_unmatched == 1  # nowhere.png
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["sidecar_unmatched"] == 1

    # JSON lines and parquet work the same; a rerun applies a new sidecar to images already kept
    (tmp_path / "alt.jsonl").write_text('{"key": "a", "caption": "from jsonl"}\n')
    again = ingest(src, tmp_path / "out", captions=tmp_path / "alt.jsonl")
    captions = dict(pd.read_parquet(again.manifest)[["source_path", "caption"]].values)
    assert captions[str(src / "a.png")] == "from jsonl" and again.sidecar_unmatched == 0

    bad = {
        "missing.csv": None,
        "cols.csv": "name,words\na.png,hi\n",
        "twice.csv": "file,caption\na.png,one\na.png,two\n",
        "table.xlsx": "not a table",
        "broken.parquet": "not parquet",
    }
    messages = {
        "missing.csv": "caption sidecar not found",
        "cols.csv": "needs a key column",
        "twice.csv": "key 'a.png' has two different captions",
        "table.xlsx": "unsupported format .xlsx",
        "broken.parquet": "cannot be read",
    }
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=messages[name]):
            ingest(src, tmp_path / f"bad-{name}", captions=tmp_path / name)
        assert not (tmp_path / f"bad-{name}").exists()  # nothing written for a bad sidecar


def test_great_expectations_gate(odd_folder, tmp_path):
    result = ingest(odd_folder, tmp_path / "out")
    manifest = pd.read_parquet(result.manifest)
    gate = run_gate(manifest, tmp_path / "gate")
    assert gate.success and gate.result_path.is_file()
    bad = pd.concat([manifest, manifest.iloc[:1]])  # duplicated id
    bad.loc[bad.index[0], "format"] = "XCF"
    with pytest.raises(GateFailed, match="expect_column_values_to_be_unique\\(id\\)") as err:
        run_gate(bad, tmp_path / "gate-bad")
    assert "expect_column_values_to_be_in_set(format)" in str(err.value)
    assert (tmp_path / "gate-bad" / "ge_result.json").is_file()
    page = (tmp_path / "gate-bad" / "ge_result.html").read_text()
    assert "ingest manifest: FAILED" in page and "3 of 13 expectations failed" in page
    first_row = page.index("<tr class=")
    assert page.index("FAIL</td>", first_row) < page.index("pass</td>", first_row)  # failures listed first
    assert "expect_column_values_to_be_in_set(format)" in page and "XCF" in page  # what was seen
    assert "ingest manifest: passed" in (tmp_path / "gate" / "ge_result.html").read_text()


def test_gate_outcomes_are_logged_to_mlflow_pass_or_fail(odd_folder, tmp_path):
    import mlflow

    from components.ingest.gate import DATA_EXPERIMENT, tracked_gate

    manifest = pd.read_parquet(ingest(odd_folder, tmp_path / "out").manifest)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    bad = pd.concat([manifest, manifest.iloc[:1]])
    with pytest.raises(GateFailed):
        tracked_gate(lambda: run_gate(bad, tmp_path / "gate-bad"), "ingest", {"dataset_hash": "h1"}, uri)
    tracked_gate(lambda: run_gate(manifest, tmp_path / "gate-ok"), "ingest", {"dataset_hash": "h2"}, uri)
    tracked_gate(lambda: run_gate(manifest, tmp_path / "gate-untracked"), "ingest", {}, tracking_uri="")
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # no process-wide MLflow state changed

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(DATA_EXPERIMENT)
    runs = {r.data.tags["dataset_hash"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"h1", "h2"}  # the untracked call logged nothing
    failed, passed = runs["h1"], runs["h2"]
    assert failed.info.status == "FAILED" and failed.data.tags["gate"] == "failed"
    assert failed.data.metrics["failed_expectations"] == 2 and passed.data.metrics["gate_passed"] == 1.0
    assert passed.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert {"ge_result.json", "ge_result.html", "failed_expectations.txt"} <= artifacts
    listed = mlflow.artifacts.load_text(f"{failed.info.artifact_uri}/failed_expectations.txt")
    assert "expect_column_values_to_be_unique(id)" in listed


@pytest.mark.slow
def test_cli_and_kfp_component(odd_folder, tmp_path):
    import subprocess
    import sys

    from kfp import compiler, dsl

    from components.ingest.component import ingest_group_op, ingest_merge_op
    from components.plan.component import plan_op

    proc = subprocess.run([sys.executable, "-m", "components.ingest", str(odd_folder), str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"kept": 6' in proc.stdout and (tmp_path / "cli" / "ge_result.json").is_file()
    cmd = [sys.executable, "-m", "components.ingest", str(tmp_path / "nope"), str(tmp_path / "x")]
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ingest source not found")

    @dsl.pipeline(name="ingest-only")
    def only(source: str = "/data/raw", data_root: str = "s3://b/plane"):
        plan = plan_op(source=source, data_root=data_root)
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=3) as group:
            part = ingest_group_op(group=group)
        ingest_merge_op(
            groups=plan.outputs["Output"], parts=dsl.Collected(part.outputs["manifest"]), source=source
        )

    compiler.Compiler().compile(only, str(tmp_path / "p.yaml"))
    text = (tmp_path / "p.yaml").read_text()
    assert "ingest-group-op" in text and "ingest-merge-op" in text and "parallelismLimit: 3" in text
