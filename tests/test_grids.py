"""Multi-image grids (components/grids): annotators, ground-truth maps, the grid builder, Template C."""

import json
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from common.errors import ConfigError
from components.grids.annotators import registry
from components.grids.grid import (
    GRID_COLUMNS,
    KIND_NAMES,
    LAYOUTS,
    GridConfig,
    build_grids,
    choose_grid,
    fit_image,
    grid_caption_texts,
    grid_config,
    grid_fill,
)
from components.grids.ground_truth import ground_truth_maps
from components.tier.tier import TRAIN_COLUMNS
from components.train.data import read_manifest
from data_tools.synthetic import SceneObject, build_synthetic
from model import prompts
from model.prompts import GRID_DOMAIN, apply_grid_prompt, apply_system_prompt

CAPTIONS = [
    {"granularity": "short", "language": "en", "text": "a red ball on a table"},
    {"granularity": "short", "language": "zh", "text": "桌子上的红色球"},
]


@pytest.fixture(autouse=True)
def no_model_weights(monkeypatch):
    """No depth / pose weights from the environment unless a test sets them; a fresh registry."""
    for env in registry.WEIGHTS_ENV.values():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry.reload()
    yield
    registry.reload()


def photo(path, size=(96, 64)):
    """A small non-synthetic image: a gradient with a few shapes (edges for canny and the sketch)."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)
    arr = np.stack([np.tile(x, (h, 1)), np.tile(x[::-1], (h, 1)), np.full((h, w), 90, np.uint8)], axis=-1)
    image = Image.fromarray(arr)
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 40, 40), fill=(250, 250, 250))
    draw.rectangle((55, 20, 85, 55), fill=(10, 10, 10))
    image.save(path)
    return image


def real_row(path, rid="photo0"):
    return {
        "id": rid,
        "image_path": str(path),
        "domain": "real",
        "captions": json.dumps(CAPTIONS),
        "score": 0.5,
    }


def test_canny_and_sketch_maps_have_the_image_size(tmp_path):
    image = photo(tmp_path / "p.png")
    offered = {a.name: a for a in registry.available()}
    assert {"canny", "sketch"} <= set(offered)
    for name in ("canny", "sketch"):
        annotator = offered[name]
        assert annotator.kind == name and annotator.version.startswith("1+opencv-")
        out = annotator(image)
        assert out.size == image.size and out.mode == "RGB"
    edges = np.asarray(offered["canny"](image))[..., 0]
    assert edges.max() == 255 and (edges > 0).mean() < 0.3  # edges, not a filled image
    sketch = np.asarray(offered["sketch"](image))[..., 0]
    assert np.median(sketch) > 200 and sketch.min() < 128  # dark strokes on white
    assert registry.for_kind("canny").name == "canny" and registry.for_kind("mask") is None
    with pytest.raises(ConfigError, match="unknown map kind"):
        registry.for_kind("normals")


def test_ground_truth_depth_orders_overlapping_objects():
    first = SceneObject("square", "red", "left", (4, 4, 30, 30))
    second = SceneObject("circle", "blue", "left", (18, 18, 44, 44))
    maps = ground_truth_maps([first, second], (48, 40))
    assert set(maps) == {"depth", "mask", "canny"} and all(m.size == (48, 40) for m in maps.values())
    depth = np.asarray(maps["depth"])[..., 0]
    overlap, only_first, background = (24, 24), (8, 8), (2, 46)  # (y, x)
    assert depth[overlap] == 255 > depth[only_first] > depth[background] == 0  # later = nearer = brighter
    mask = np.asarray(maps["mask"])
    assert tuple(mask[overlap]) != tuple(mask[only_first]) and tuple(mask[background]) == (0, 0, 0)
    edges = np.asarray(maps["canny"])[..., 0]
    assert edges[20, 4] == 255 and edges[8, 8] == 0 and edges[2, 46] == 0  # outline only
    flipped = np.asarray(ground_truth_maps([second, first], (48, 40))["depth"])[..., 0]
    assert flipped[overlap] == 255 and flipped[38, 38] < 255  # the square is now on top
    with pytest.raises(ConfigError, match="scene object 0"):
        ground_truth_maps([{"shape": "hexagon", "color": "red", "bbox": [0, 0, 4, 4]}], 8)


@pytest.mark.parametrize(
    ("layout", "image_box", "map_box"),
    [("upper-lower", (0, 0, 64, 64), (0, 64, 64, 128)), ("right-left", (64, 0, 128, 64), (0, 0, 64, 64))],
)
def test_dual_panel_grid_has_image_and_map_in_place(tmp_path, layout, image_box, map_box):
    manifest = build_synthetic(tmp_path / "syn", n=3, size=64, seed=1)
    rows = pd.read_parquet(manifest).to_dict("records")
    config = {"kinds": {"depth": 1}, "layouts": {layout: 1}, "resolution": 128}
    grids = build_grids(rows, tmp_path / "grids", config, image_root=manifest.parent)
    assert len(grids) == 3
    row = grids[0]
    assert row["domain"] == GRID_DOMAIN and row["system_prompt"] == "C" and row["grid_layout"] == layout
    assert row["grid_kind"] == "depth" and json.loads(row["grid_maps"]) == {"depth": "ground-truth"}
    assert list(row)[: len(TRAIN_COLUMNS)] == TRAIN_COLUMNS and set(GRID_COLUMNS) <= set(row)
    grid = Image.open(tmp_path / "grids" / row["image_path"]).convert("RGB")
    assert grid.size == (row["width"], row["height"]) and all(s % 16 == 0 for s in grid.size)
    source = Image.open(manifest.parent / rows[0]["image_path"]).convert("RGB")
    meta = json.loads((manifest.parent / "metadata.jsonl").read_text().splitlines()[0])
    expected_map = ground_truth_maps(meta["objects"], 64)["depth"]
    np.testing.assert_array_equal(np.asarray(grid.crop(image_box)), np.asarray(fit_image(source, (64, 64))))
    np.testing.assert_array_equal(np.asarray(grid.crop(map_box)), np.asarray(expected_map))
    records = read_manifest(tmp_path / "grids" / "grids.parquet")  # the trainer's reader accepts it
    assert len(records) == 3 and records[0].image_path.is_file() and records[0].domain == "grid"
    summary = json.loads((tmp_path / "grids" / "grids.json").read_text())
    assert summary["grids"] == 3 and summary["layouts"] == {layout: 3}


def test_captions_carry_the_fill_ins_in_both_languages(tmp_path):
    photo(tmp_path / "p.png")
    config = {"kinds": {"canny": 1}, "layouts": {"upper-lower": 1}}
    (row,) = build_grids([real_row(tmp_path / "p.png")], tmp_path / "grids", config)
    assert json.loads(row["captions"]) == CAPTIONS  # the source captions, unchanged
    en, zh = grid_caption_texts(row)
    assert en == (
        "Generate a dual-panel image where the lower half displays a canny edge map, while the upper "
        "half retains the original image for direct visual comparison. <Prompt Start> a red ball on a table"
    )
    assert en == apply_system_prompt(
        "a red ball on a table", "C", panel_a="lower half", panel_kind="canny edge map", panel_b="upper half"
    )
    assert "下半部分显示Canny边缘图" in zh and "上半部分保留原始图像" in zh and zh.endswith("桌子上的红色球")
    fill = grid_fill(LAYOUTS["2x2"], ["depth", "canny", "sketch"])
    en4 = apply_grid_prompt("a cat", fill["en"], "en")
    assert en4.startswith("Generate a four-panel image arranged in a 2x2 grid where the top-right panel ")
    assert "displays a depth map, the bottom-left panel displays a canny edge map and the bottom-right" in en4
    assert "while the top-left panel retains the original image" in en4
    zh4 = apply_grid_prompt("一只猫", fill["zh"], "zh")
    assert "右上方画面显示深度图，左下方画面显示Canny边缘图，右下方画面显示素描图" in zh4
    assert apply_grid_prompt("x", fill["en"], "de").startswith("Generate a four-panel")  # English fallback
    for kind, name in getattr(prompts, "PANEL_KINDS", {}).items():  # the dual-panel sampler's words
        assert KIND_NAMES[kind]["en"] == name
    with pytest.raises(ConfigError, match="lacks the fill-in 'panel_maps'"):
        apply_grid_prompt("x", {"panels": "2x2", "panel_b": "top-left panel"})


def test_config_ratios_are_followed_and_seeded(tmp_path):
    config = GridConfig(
        kinds={"canny": 3, "sketch": 1, "depth": 0}, layouts={"upper-lower": 1, "left-right": 3}
    )
    kinds = ("canny", "sketch", "depth")

    def draws(seed, n=4000):
        rng = random.Random(seed)
        return [choose_grid(rng, kinds, config) for _ in range(n)]

    picks = draws(7)
    layouts = [layout.name for layout, _ in picks]
    chosen = [k[0] for _, k in picks]
    assert abs(layouts.count("left-right") / len(picks) - 0.75) < 0.03
    assert abs(chosen.count("canny") / len(picks) - 0.75) < 0.03 and "depth" not in chosen
    assert [(lay.name, k) for lay, k in draws(7, 50)] == [(lay.name, k) for lay, k in picks[:50]]
    # 2x2 needs three kinds: with two weighted, the dual layouts are drawn instead
    two = GridConfig(kinds={"canny": 1, "sketch": 1}, layouts={"2x2": 5, "upper-lower": 1})
    assert {choose_grid(random.Random(i), kinds, two)[0].name for i in range(20)} == {"upper-lower"}
    full = GridConfig(layouts={"2x2": 1})
    layout, three = choose_grid(random.Random(0), ("canny", "sketch", "depth", "mask"), full)
    assert layout.name == "2x2" and len(set(three)) == 3
    assert choose_grid(random.Random(0), ("pose",), config) is None
    # build_grids: seeded, max_grids, 2x2 from the ground truth of synthetic scenes
    manifest = build_synthetic(tmp_path / "syn", n=6, size=64, seed=2)
    rows = pd.read_parquet(manifest).to_dict("records")
    cfg = {"layouts": {"2x2": 1, "left-right": 1}, "max_grids": 4, "seed": 3, "resolution": 128}
    first = build_grids(rows, tmp_path / "a", cfg, image_root=manifest.parent)
    again = build_grids(rows, tmp_path / "b", cfg, image_root=manifest.parent)
    assert len(first) == 4 and [r["id"] for r in first] == [r["id"] for r in again]
    assert {r["grid_layout"] for r in first} <= {"2x2", "left-right"}
    for r in first:
        assert set(r["grid_kind"].split(",")) <= {"canny", "depth", "mask", "sketch"}  # no pose on shapes


def tiny_depth(folder):
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=28,
        patch_size=14, out_indices=[1, 2], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 16],
        reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=8, patch_size=14,
    )  # fmt: skip
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 28, "width": 28}, keep_aspect_ratio=False, ensure_multiple_of=14
    ).save_pretrained(folder)
    return str(folder)


def tiny_pose(folder):
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
        VitPoseImageProcessor,
    )

    backbone = VitPoseBackboneConfig(
        image_size=[32, 24], patch_size=[8, 8], hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        mlp_ratio=2, out_indices=[2],
    )  # fmt: skip
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone)).save_pretrained(folder)
    VitPoseImageProcessor(size={"height": 32, "width": 24}).save_pretrained(folder)
    return str(folder)


def test_model_annotators_need_weights_and_run_with_tiny_ones(tmp_path, monkeypatch):
    reasons = registry.not_run()
    assert set(reasons) == {"depth", "pose"} and {a.name for a in registry.available()} == {"canny", "sketch"}
    assert all(r.startswith("not run: no weights configured") for r in reasons.values())
    assert registry.not_run({"depth": str(tmp_path / "nowhere")})["depth"].startswith(
        "not run: weights not found"
    )
    depth, pose = tiny_depth(tmp_path / "depth"), tiny_pose(tmp_path / "pose")
    image = photo(tmp_path / "p.png")
    offered = {a.name: a for a in registry.available({"depth": depth, "pose": pose})}
    assert (
        offered["depth"].model == depth
        and offered["depth"].kind == "depth"
        and offered["pose"].kind == "pose"
    )
    for name in ("depth", "pose"):
        out = offered[name](image)
        assert out.size == image.size and out.mode == "RGB"
    monkeypatch.setenv("LUMINA_DEPTH_MODEL", depth)  # the environment works as well
    registry.reload()
    assert registry.for_kind("depth").model == depth and "pose" in registry.not_run()
    config = {
        "kinds": {"depth": 1},
        "layouts": {"left-right": 1},
        "weights": {"pose": str(tmp_path / "p.png")},
    }
    (row,) = build_grids([real_row(tmp_path / "p.png")], tmp_path / "grids", config)
    assert json.loads(row["grid_maps"])["depth"].startswith("depth@1+transformers-")
    (tmp_path / "empty").mkdir()
    build_grids(
        [real_row(tmp_path / "p.png")], tmp_path / "g2", {"weights": {"depth": str(tmp_path / "empty")}}
    )
    summary = json.loads((tmp_path / "g2" / "grids.json").read_text())
    assert summary["not_run"]["depth"].startswith("not run: cannot load AutoModelForDepthEstimation")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"kinds": {"normals": 1}}, "grid config: invalid kinds: .*unknown map kind normals"),
        ({"layouts": {"diagonal": 1}}, "grid config: invalid layouts: .*unknown layout diagonal"),
        ({"kinds": {"canny": 0}}, "at least one map kind needs a positive weight"),
        ({"layouts": {"upper-lower": -1, "2x2": 1}}, "must not be negative"),
        ({"weights": {"canny": "x"}}, "no model annotator canny"),
        ({"max_grid": 3}, "grid config: invalid max_grid"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, config, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_grids([], tmp_path, config)
    assert "\n" not in str(info.value)
    assert grid_config(None) == GridConfig()


def test_unreadable_images_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"grid source gone: cannot read .*missing\.png") as info:
        build_grids([real_row(tmp_path / "missing.png", "gone")], tmp_path / "g", {})
    assert "\n" not in str(info.value)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match="grid source broken: cannot decode image"):
        build_grids([real_row(tmp_path / "bad.png", "broken")], tmp_path / "g", {})
    # a row without captions or already a grid makes no grid (and no error)
    photo(tmp_path / "p.png")
    rows = [
        {**real_row(tmp_path / "p.png"), "captions": "[]"},
        {**real_row(tmp_path / "p.png"), "domain": "grid"},
    ]
    assert build_grids(rows, tmp_path / "g", {}) == []
    assert json.loads((tmp_path / "g" / "grids.json").read_text())["skipped"] == {
        "no captions": 1,
        "already a grid": 1,
    }


def test_the_trainer_gives_grid_rows_template_c_with_their_fill_ins(tmp_path):
    """A grids.parquet read as a training manifest: every caption variant, the drawn caption and the
    validation caption of a grid row carry Template C in the caption's language (never the domain's
    Template B); a broken ``grid_fill`` is a one-line error naming the image."""
    from dataclasses import replace

    from components.train.data import caption_texts, choose_caption, prompt_texts
    from components.train.validation import validation_caption
    from model.prompts import DOMAIN_TEMPLATES, TEMPLATES, SystemPrompt

    photo(tmp_path / "p.png")
    config = {"kinds": {"sketch": 1}, "layouts": {"left-right": 1}}
    (row,) = build_grids([real_row(tmp_path / "p.png")], tmp_path / "grids", config)
    (record,) = read_manifest(tmp_path / "grids" / "grids.parquet")
    assert record.domain == GRID_DOMAIN and record.grid_fill == row["grid_fill"]
    texts = caption_texts(record, DOMAIN_TEMPLATES)
    assert texts == grid_caption_texts(row)
    assert texts[0].startswith("Generate a dual-panel image where the right half displays a sketch")
    assert texts[1].startswith("生成一幅双联图像，其中右半部分显示素描图")
    assert not any(TEMPLATES[SystemPrompt.B] in t for t in texts)
    drawn = {
        choose_caption(record, random.Random(i), {}, {"en": 1, "zh": 1}, DOMAIN_TEMPLATES) for i in range(20)
    }
    assert drawn == set(texts)
    assert validation_caption(record) == texts[0]
    plain = replace(record, domain="real", grid_fill=None)  # the same captions on an ordinary image
    assert caption_texts(plain, DOMAIN_TEMPLATES)[0].startswith(TEMPLATES[SystemPrompt.B])
    for broken, match in (("{not json", "grid_fill is not valid JSON"), ('{"zh": {}}', "English fill-ins")):
        with pytest.raises(ConfigError, match=match) as err:
            prompt_texts(replace(record, grid_fill=broken), record.captions)
        assert record.id in str(err.value) and "\n" not in str(err.value)


def test_grid_step_reads_and_writes_shards_on_s3(s3, tmp_path):
    """On a cluster the group's images and its grid shards live on object storage: the step reads
    the tier images by range from S3 shards and writes the grids as S3 shards the latent step reads."""
    import io

    from components.grids.group import grids_group, unified_resolution, unified_rows
    from components.plan.plan import Group
    from storage import write_parquet
    from storage.shards import ShardWriter, read_member

    prefix = "s3://lumina/plane/groups/g00000"
    writer = ShardWriter(f"{prefix}/shards", "g00000")
    rows = []
    for i in range(3):
        buf = io.BytesIO()
        photo(tmp_path / f"p{i}.png").save(buf, format="PNG")
        ref = writer.add(f"p{i}.png", buf.getvalue())
        rows.append({**real_row(None, f"p{i}"), "image_path": None, **ref.as_row(), "width": 96, "height": 64,
                     "lowres": True, "highres": True, "hq": True})  # fmt: skip
    writer.flush()
    write_parquet(pd.DataFrame(rows), f"{prefix}/tiers.parquet")
    group = Group("g00000", f"{prefix}/listing.parquet", prefix, 3)
    config = {"kinds": {"canny": 1}, "layouts": {"left-right": 1}, "ordinary_share": 0.0}
    summary = grids_group(group, tmp_path / "out", profile="tiny", config=config)
    grids, mixed = unified_rows(tmp_path / "out")
    assert summary["grids"] == len(grids) == 3 and mixed == set()
    assert summary["config"]["resolution"] == unified_resolution("tiny")  # the unified stage's buckets
    again = grids_group(group, tmp_path / "again", profile="tiny", config=GridConfig(**config))
    assert again["config"] == summary["config"]  # a GridConfig object: the same unset defaults
    for row in grids.to_dict("records"):
        assert row["shard"].startswith(f"{prefix}/grids/") and row["image_path"] is None
        image = Image.open(io.BytesIO(read_member(row)))
        assert image.size == (row["width"], row["height"]) and image.width == 2 * image.height
