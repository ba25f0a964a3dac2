import csv
import io
import struct
import tarfile
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.ingest.gate import GateFailed, run_gate
from components.ingest.ingest import IngestOptions, dhash, hamming, ingest
from model.errors import ConfigError


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
    for row in kept.values():
        assert (tmp_path / "out" / row["path"]).read_bytes()  # original bytes stored in a shard


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


def test_cli_and_kfp_component(odd_folder, tmp_path):
    import subprocess
    import sys

    from kfp import compiler, dsl

    from components.ingest.component import ingest_op

    proc = subprocess.run([sys.executable, "-m", "components.ingest", str(odd_folder), str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"kept": 6' in proc.stdout and (tmp_path / "cli" / "ge_result.json").is_file()
    cmd = [sys.executable, "-m", "components.ingest", str(tmp_path / "nope"), str(tmp_path / "x")]
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ingest source not found")

    @dsl.pipeline(name="ingest-only")
    def only(source: str = "/data/raw"):
        ingest_op(source=source)

    compiler.Compiler().compile(only, str(tmp_path / "p.yaml"))
    assert "ingest-op" in (tmp_path / "p.yaml").read_text()
