"""Grid-panel metrics (components/evaluate/panels.py): edge F1 and mask IoU on hand-made maps, the
ground truth aligned with the fitted image panel (an independent annotator scores ~1 through
``panel_scores``), the random tiny model, and ``run_evaluation(baseline=...)`` with its report."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from components.evaluate.evaluate import EvalConfig, run_evaluation
from components.evaluate.panels import (
    PANEL_DIR,
    edge_f1,
    edge_map,
    foreground,
    mask_iou,
    merge_records,
    panel_scenes,
    panel_scores,
    panel_side,
    score_panel,
)
from components.evaluate.report import PANEL_HEADING, PanelImages, panel_section
from data_tools.synthetic import BACKGROUND
from model.prompts import PANEL_KINDS, SystemPrompt, panel_prompt
from model.sampler import SamplerConfig
from model.sampler.conditioning import Layout, Task, parse_task

SMALL = dict(height=64, width=64, seed=0, sampler=SamplerConfig(steps=2))


# ---------------------------------------------------------------------------- hand-made maps
def line(cols: slice, row: int = 5, shape: tuple[int, int] = (12, 12)) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[row, cols] = True
    return out


def test_edge_f1_on_hand_made_maps():
    truth = line(slice(1, 11))
    assert edge_f1(truth, truth) == 1.0
    assert edge_f1(line(slice(1, 11), row=0), line(slice(1, 11), row=11)) == 0.0  # 11 px apart
    shifted = line(slice(1, 11), row=6)  # one pixel down
    assert edge_f1(shifted, truth, tolerance=1) == 1.0
    assert edge_f1(shifted, truth, tolerance=0) == 0.0
    # half of the line found plus 5 stray pixels far away: precision 5/10; the dilated half
    # reaches 6 of the 10 true pixels (columns 1..6): recall 6/10, F1 = 2·0.5·0.6/1.1 = 6/11
    pred = line(slice(1, 6)) | line(slice(1, 6), row=11)
    assert edge_f1(pred, truth) == pytest.approx(6 / 11)
    empty = np.zeros((12, 12), dtype=bool)
    assert edge_f1(empty, empty) == 1.0 and edge_f1(empty, truth) == 0.0 and edge_f1(truth, empty) == 0.0
    with pytest.raises(ValueError, match="shape"):
        edge_f1(truth, truth[:-1])


def test_mask_iou_on_hand_made_maps():
    a = np.zeros((10, 10), dtype=bool)
    a[2:6, 2:6] = True
    b = np.roll(a, 2, axis=1)  # columns 4..7: 8 shared of 24 pixels
    assert mask_iou(a, a) == 1.0 and mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, np.roll(a, 5, axis=0)) == 0.0
    empty = np.zeros_like(a)
    assert mask_iou(empty, empty) == 1.0 and mask_iou(a, empty) == 0.0
    colours = np.zeros((10, 10, 3), dtype=np.uint8)  # an image: any non-black pixel is foreground
    colours[2:6, 2:4] = (0, 128, 128)
    colours[2:6, 4:6] = (230, 25, 75)
    assert mask_iou(colours, a) == 1.0


def test_binarisation_of_generated_panels():
    grey = np.full((8, 8, 3), 100, np.uint8)
    grey[3] = 200  # a bright row: the only edge
    assert edge_map(grey).sum() == 8 and edge_map(grey)[3].all()
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[:2] = (0, 128, 128)  # the dimmest palette colour is foreground
    mask[2:4] = (40, 40, 40)  # near-black decoding noise is not
    assert foreground(Image.fromarray(mask)).sum() == 16


# ---------------------------------------------------------------------------- mask as a task
def test_mask_is_a_panel_task_worded_like_the_grids():
    assert parse_task("mask") is Task.MASK and Task.MASK.generates_map
    assert Task.IMAGE_FROM_MASK.kind == "mask" and not Task.IMAGE_FROM_MASK.generates_map
    assert PANEL_KINDS["mask"] == "segmentation mask"
    assert "the lower half displays a segmentation mask, while the upper half" in panel_prompt("x", "mask")


# ---------------------------------------------------------------------------- scenes and oracle
def test_ground_truth_of_the_fitted_scene():
    scenes = panel_scenes(3, 128, 64)
    assert [s.index for s in scenes] == [0, 1, 2] and all(s.prompt for s in scenes)
    for scene in scenes:
        assert scene.image.size == scene.truth["canny"].size == scene.truth["mask"].size == (64, 64)
        for kind in ("canny", "mask"):
            assert score_panel(kind, scene.truth[kind], scene.truth[kind]) == 1.0
    blank = Image.new("RGB", (64, 64))
    assert score_panel("canny", blank, scenes[0].truth["canny"]) == 0.0
    assert score_panel("mask", blank, scenes[0].truth["mask"]) == 0.0
    assert panel_side(128) == 64 and panel_side(100) == 48 and panel_side(16) == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        panel_scenes(1, 128, 40)


class PixelVae:
    """Encodes an image as its own pixels (latents = pixels in [-1, 1]), so a stand-in generator
    sees the known panel exactly."""

    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(shift_factor=0.0, scaling_factor=1.0)

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: pixels))


class AnnotatorSampler:
    """A perfect panel generator that never sees the ground truth: it draws the map from the known
    image panel (OpenCV Canny; foreground = pixels away from the background colour), optionally
    shifted by ``shift`` pixels to the right."""

    vae = PixelVae()

    def __init__(self, shift: int = 0):
        self.shift, self.calls = shift, []

    def generate(self, prompts, *, height, width, seed, config, condition):
        self.calls.append((condition.task, condition.layout, height, width, config.system_prompt))
        pixels = ((condition.reference.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        assert pixels.shape[1:3] == (height // 2, width) and len(prompts) == len(pixels)
        images = []
        for image in pixels:
            if condition.task is Task.CANNY:
                drawn = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 50, 150)
            else:
                away = np.abs(image.astype(int) - np.array(BACKGROUND)).max(-1) > 40
                drawn = np.where(away, 255, 0).astype(np.uint8)
            images.append(Image.fromarray(np.roll(drawn, self.shift, axis=1)).convert("RGB"))
        return SimpleNamespace(images=images)


def test_an_independent_annotator_scores_high_and_a_shifted_one_does_not():
    cfg = EvalConfig(height=128, width=128, seed=0)
    good = AnnotatorSampler()
    result = panel_scores(good, cfg, 6)  # two batches (4 + 2)
    assert result.metrics["panel_canny_f1"] > 0.97  # exact at 1 px tolerance on these scenes
    assert result.metrics["panel_mask_iou"] > 0.85  # the fitted image's anti-aliased borders
    assert [r["index"] for r in result.records] == list(range(6))
    assert all(0.9 < r["scores"]["canny_f1"] <= 1.0 for r in result.records)
    assert {c[0] for c in good.calls} == {Task.CANNY, Task.MASK} and len(good.calls) == 4
    assert all(c[1:] == (Layout.UPPER_LOWER, 128, 64, SystemPrompt.C) for c in good.calls)
    shifted = panel_scores(AnnotatorSampler(shift=4), cfg, 6)
    assert shifted.metrics["panel_canny_f1"] < 0.6
    assert shifted.metrics["panel_mask_iou"] < result.metrics["panel_mask_iou"] - 0.1


# ---------------------------------------------------------------------------- the tiny model
def test_panel_scores_of_the_random_tiny_model(tiny_sampler, tmp_path):
    cfg = EvalConfig(**SMALL)
    result = panel_scores(tiny_sampler, cfg, 2, out_dir=tmp_path, label="after")
    assert set(result.metrics) == {"panel_canny_f1", "panel_mask_iou"}
    assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in result.metrics.values())
    assert len(result.records) == 2
    record = result.records[0]
    assert record["image"] == f"{PANEL_DIR}/scenes/0000_image.png"
    assert record["generated"] == {"canny": f"{PANEL_DIR}/after/0000_canny.png",
                                   "mask": f"{PANEL_DIR}/after/0000_mask.png"}  # fmt: skip
    assert Image.open(tmp_path / record["generated"]["mask"]).size == (32, 32)  # panel of a 64x32 grid
    assert Image.open(tmp_path / record["truth"]["canny"]).size == (32, 32)
    mean = np.mean([r["scores"]["mask_iou"] for r in result.records])
    assert result.metrics["panel_mask_iou"] == pytest.approx(mean)


def test_run_evaluation_with_a_baseline_reports_before_and_after(tiny_folder, tmp_path):
    cfg = EvalConfig(suites=["synthetic"], synthetic_size=1, heldout=1, panels=2, **SMALL)
    result = run_evaluation(tiny_folder, tmp_path, cfg, progress=False, baseline=tiny_folder)
    metrics = json.loads(result.metrics_path.read_text())["metrics"]
    keys = ("panel_canny_f1", "panel_mask_iou")
    for key in keys:
        assert 0.0 <= metrics[key] <= 1.0
        assert metrics[f"{key}_before"] == metrics[key]  # same weights, same scenes and noise
    assert len(result.panels) == 2 and {"before", "after"} <= set(result.panels[0])
    assert json.loads((tmp_path / PANEL_DIR / "panels.json").read_text()) == result.panels
    html = result.report_path.read_text()
    assert PANEL_HEADING in html
    section = html[html.index("<section id='panels'>") :]
    section = section[: section.index("</section>")]
    # per scene: known image, 2 truths, 2 before, 2 after, all embedded
    assert len(re.findall(r"<img src='data:image/png;base64,", section)) == 2 * 7
    assert "before canny" in section and "no baseline given" not in section


def test_panel_section_without_a_baseline(tmp_path):
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "a.png")
    after = [{"index": 0, "prompt": "one red circle", "image": "a.png", "truth": {"canny": "a.png"},
              "generated": {"canny": "a.png", "mask": "missing.png"},
              "scores": {"canny_f1": 0.25, "mask_iou": 0.5}}]  # fmt: skip
    html = panel_section(
        {"panel_canny_f1": 0.25, "panel_mask_iou": 0.5}, PanelImages(merge_records(after), tmp_path)
    )
    assert "no baseline given" in html and "before canny" not in html
    assert html.count("data:image/png;base64,") == 3  # image, truth canny, after canny
    assert "ground truth mask: no image" in html and "after mask: image not readable" in html
    assert "0.25" in html and "one red circle" in html
