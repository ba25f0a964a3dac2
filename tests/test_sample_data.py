import hashlib
import json

import pandas as pd
from PIL import Image

from components.train.data import read_manifest
from data_tools.synthetic import BACKGROUND, COLORS, build_synthetic


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_synthetic_set_is_deterministic(tmp_path):
    build_synthetic(tmp_path / "a", n=12, size=128, seed=3)
    build_synthetic(tmp_path / "b", n=12, size=128, seed=3)
    build_synthetic(tmp_path / "c", n=12, size=128, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_metadata_matches_the_rendered_pixels(tmp_path):
    build_synthetic(tmp_path, n=20, size=128)
    for line in (tmp_path / "metadata.jsonl").read_text().splitlines():
        meta = json.loads(line)
        image = Image.open(tmp_path / meta["file"]).convert("RGB")
        assert image.size == (meta["width"], meta["height"])
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 2)) == COLORS[obj["color"]]
            assert image.getpixel((x0 - 2, y0 - 2)) == BACKGROUND
        count = len(meta["objects"])
        texts = {(c["granularity"], c["language"]): c["text"] for c in meta["captions"]}
        assert f"with {count} object" in texts[("detailed", "en")]
        assert len(texts[("detailed", "en")]) > len(texts[("medium", "en")]) > len(texts[("short", "en")])
        assert all(obj["color"] in texts[("short", "en")] for obj in meta["objects"])
        assert "的" in texts[("short", "zh")]


def test_manifest_is_a_valid_training_manifest(tmp_path):
    manifest = build_synthetic(tmp_path, n=6, size=128)
    records = read_manifest(manifest)
    assert len(records) == 6 and all(r.image_path.is_file() for r in records)
    assert {c.granularity for c in records[0].captions} == {"detailed", "medium", "short", "tag"}
    assert set(pd.read_parquet(manifest)["domain"]) == {"synthetic"}
