import hashlib
import json

import pandas as pd
import pytest
from PIL import Image

from common.errors import ConfigError
from components.evaluate.suites import synthetic_suite
from components.grids.ground_truth import scene_objects
from components.recaption.backends import alt_text_captions
from components.train.data import read_manifest
from data_tools import bundled
from data_tools.bundled import IMAGES, build_bundled
from data_tools.debian import SourceUnavailable
from data_tools.synthetic import BACKGROUND, COLORS, build_synthetic, is_heldout, scene_key


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_synthetic_set_is_deterministic(tmp_path):
    build_synthetic(tmp_path / "a", n=12, size=128, seed=3)
    build_synthetic(tmp_path / "b", n=12, size=128, seed=3)
    build_synthetic(tmp_path / "c", n=12, size=128, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_the_evaluation_suite_never_asks_for_a_training_scene(tmp_path):
    """The held-out split is by the scene's groups: with 600 training scenes (more than the sample
    data's 512) the one-group space is exhausted, yet no suite prompt is a training scene."""
    build_synthetic(tmp_path, n=600, size=64)
    trained = set()
    for line in (tmp_path / "metadata.jsonl").read_text().splitlines():
        trained.add(scene_key(scene_objects(json.loads(line)["objects"])))
    assert len(trained) == 600 and not any(is_heldout(key) for key in trained)
    suite = [scene_key(item.metadata["objects"]) for item in synthetic_suite(64, 128)]
    assert len(set(suite)) == 64 and all(is_heldout(key) for key in suite)
    assert not trained & set(suite)
    one_group = [key for key in suite if len(key) == 1]
    assert 10 <= len(one_group) <= 40  # both kinds of scene are asked for


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


def test_bundled_wheel_photographs(tmp_path):
    out = build_bundled(tmp_path / "a")
    records = [json.loads(line) for line in (out / "bundled.jsonl").read_text().splitlines()]
    assert len(records) == len(IMAGES) and {r["package"] for r in records} == {"scikit-image", "scikit-learn"}
    for record in records:
        image = Image.open(out / record["file"])
        assert (
            image.mode == "RGB"
            and max(image.size) <= 768
            and image.size == (record["width"], record["height"])
        )
        assert record["license"] and record["credit"]
        txt = out / record["file"].replace(".jpg", ".txt")
        assert txt.is_file() == (record["package"] == "scikit-image")  # sklearn's images have no description
    chelsea = next(r for r in records if r["original_path"].endswith("chelsea.png"))
    assert chelsea["alt_text"] == "Chelsea the cat."
    assert alt_text_captions(chelsea["alt_text"]) == {"en": {"short": "Chelsea the cat."}}
    license_text = (out / "LICENSE").read_text()
    assert "CC0 by the photographer (Stefan van der Walt)" in license_text  # skimage's own words
    assert "creativecommons.org/licenses/by/2.0" in license_text  # sklearn's README, unchanged
    # deterministic, and a rebuild rewrites nothing
    assert _digest(build_bundled(tmp_path / "b")) == _digest(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    build_bundled(out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bundled_source_skips_what_is_not_installed(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown bundled-image package"):
        build_bundled(tmp_path, packages=["opencv"])
    missing = {
        **bundled.PACKAGES,
        "scikit-learn": bundled.BundledPackage("scikit-learn", "no_such_module.images"),
    }
    monkeypatch.setattr(bundled, "PACKAGES", missing)
    out = build_bundled(tmp_path / "partial")
    assert {json.loads(line)["package"] for line in (out / "bundled.jsonl").read_text().splitlines()} == {
        "scikit-image"
    }
    with pytest.raises(SourceUnavailable, match=r"no bundled images .*scikit-learn is not installed"):
        build_bundled(tmp_path / "none", packages=["scikit-learn"])
