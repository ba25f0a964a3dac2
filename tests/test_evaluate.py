"""Evaluation: the compositional scorer, the official layouts, and an honest run on the tiny model."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from components.evaluate.compositional import detect, score_image
from components.evaluate.evaluate import EvalConfig, run_evaluation
from components.evaluate.suites import load_suite
from data_tools.synthetic import groups, make_scene, render_scene
from model.sampler import SamplerConfig


def test_scorer_is_right_on_ground_truth_renders():
    rng = random.Random(123)
    results = []
    for _ in range(100):
        size = rng.choice([128, 256])
        objects = make_scene(rng, size)
        results.append(score_image(render_scene(objects, size), groups(objects)))
    assert all(r["overall"] == 1.0 for r in results)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star"])
def test_scorer_knows_shapes_with_soft_edges(shape):
    """A decoder softens edges: the trained tiny VAE fills a star's notches until its bounding-box
    fill (0.45) passes a triangle's threshold on fill alone; a blur of 1.5 px does the same."""
    from PIL import ImageFilter

    from data_tools.synthetic import SceneObject, object_side

    side = object_side(128)
    scene = [SceneObject(shape, "blue", "left", (10, 10, 10 + side, 10 + side))]
    soft = render_scene(scene, 128).filter(ImageFilter.GaussianBlur(1.5))
    assert [d.shape for d in detect(soft)] == [shape]


def test_scorer_catches_wrong_images():
    rng = random.Random(7)
    objects = make_scene(rng, 128)
    truth = groups(objects)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    assert score_image(noise, truth)["overall"] == 0.0 and not detect(noise)
    shape, color, region, count = truth[0]
    other_color = "green" if color != "green" else "red"
    recolored = [o.__class__(o.shape, other_color, o.region, o.bbox) for o in objects]
    assert score_image(render_scene(recolored, 128), [(shape, color, region, count)])["colors"] == 0.0
    fewer = [o for o in objects if not (o.shape == shape and o.color == color)][:0] + [
        o for o in objects if o.shape == shape and o.color == color
    ][: max(0, count - 1)]
    scores = score_image(render_scene(fewer, 128), [(shape, color, region, count)])
    assert scores["counting"] == 0.0


def test_suites_load_with_caps():
    geneval = load_suite("geneval", 2)
    assert len({i.category for i in geneval}) == 6 and len(geneval) == 12
    assert {"include", "prompt", "tag"} <= set(geneval[0].metadata)
    assert len(load_suite("dpg", 3)) == 3
    assert len({i.category for i in load_suite("t2i-compbench", 1)}) == 8
    assert len(load_suite("geneval")) == 553 and len(load_suite("dpg")) == 1065
    with pytest.raises(Exception, match="unknown suite"):
        load_suite("imagenet")


@pytest.mark.slow
def test_evaluation_of_the_tiny_model(tiny_folder, tmp_path):
    cfg = EvalConfig(
        suite_size=1, synthetic_size=4, heldout=8, height=64, width=64, sampler=SamplerConfig(steps=3)
    )
    result = run_evaluation(tiny_folder, tmp_path, cfg, progress=False)
    metrics = json.loads(result.metrics_path.read_text())["metrics"]
    assert np.isfinite(metrics["val_loss"]) and metrics["val_loss"] > 0
    assert metrics["generated_geneval"] == 6 and metrics["generated_dpg"] == 1
    assert 0.0 <= metrics["synthetic_overall"] <= metrics["synthetic_colors"] <= 1.0
    assert "not run" in json.loads(result.metrics_path.read_text())["not_run"]["clip_score"]
    # official layouts
    first = tmp_path / "geneval" / "00000"
    assert json.loads((first / "metadata.jsonl").read_text())["tag"] == "single_object"
    assert Image.open(first / "samples" / "0000.png").size == (64, 64)
    assert Image.open(tmp_path / "dpg" / "0.png").size == (128, 128)  # 2x2 grid
    assert len(list((tmp_path / "t2i-compbench").glob("*/samples/*_000000.png"))) == 8
    assert "synthetic" in result.report_path.read_text()


def test_clip_score_runs_when_weights_are_given(tiny_folder, tmp_path):
    from common.errors import WeightsNotFoundError
    from components.clip import ClipScorer, build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    cfg = EvalConfig(
        suites=["synthetic", "dpg"],
        suite_size=1,
        synthetic_size=2,
        heldout=4,
        height=64,
        width=64,
        clip_model=str(clip),
        sampler=SamplerConfig(steps=2),
    )
    result = run_evaluation(tiny_folder, tmp_path / "eval", cfg, progress=False)
    assert "clip_score" not in result.not_run
    for suite in ("synthetic", "dpg"):
        assert 0.0 <= result.metrics[f"clip_score_{suite}"] <= 100.0
    scorer = ClipScorer(clip)
    image = Image.open(tmp_path / "eval" / "synthetic" / "00000_0.png")
    assert scorer.clip_score([image], ["x"]) == scorer.clip_score([image], ["x"])  # deterministic
    with pytest.raises(WeightsNotFoundError, match="cannot load CLIP"):
        ClipScorer(tmp_path / "nope")
