"""Grid-panel metrics (issue #13): on held-out synthetic scenes, how well a generated condition
panel matches the scene's exact map.

Each scene (a scene of the held-out split, :func:`data_tools.synthetic.is_heldout`, like
the synthetic suite: never a training scene) is fitted to a square panel the way
:meth:`~model.sampler.conditioning.PanelCondition.from_image` fits an image (cover-resize, centre
crop); its ground-truth maps (:func:`components.grids.ground_truth.ground_truth_maps`) are drawn
from its boxes mapped into that panel (:func:`~components.grids.ground_truth.fit_objects`), so map
and image align pixel for pixel. The model generates an ``upper-lower`` Template C grid of
``2·side`` x ``side``: the image (upper panel) is known, the map (lower panel) is generated, prompted
with the scene's short English caption under Template C (the sampler words it from the condition
when its ``system_prompt`` is ``C``, which :func:`panel_scores` sets).

Scores, each in [0, 1], higher is better:

- ``canny``: :func:`edge_f1` of the binarised panels (:func:`edge_map`: luma > ``EDGE_THRESHOLD``),
  an edge counted as found within ``tolerance`` px (Chebyshev distance) of one on the other side;
- ``mask``: :func:`mask_iou` of the foregrounds (:func:`foreground`: brightest channel >
  ``MASK_THRESHOLD``; the ground-truth mask is each object in its own palette colour on black).

The thresholds are fixed, not fitted to the image (an Otsu threshold would find "edges" in a flat
grey or noisy panel); the same binarisation is applied to the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from components.evaluate.report import PANEL_KINDS
from components.evaluate.suites import HELDOUT_SEED, synthetic_suite
from model.prompts import SystemPrompt
from model.sampler.conditioning import PANEL_MULTIPLE, Layout, PanelCondition, Task, fit_image

if TYPE_CHECKING:
    from components.evaluate.evaluate import EvalConfig
    from model.sampler import LuminaSampler

EDGE_THRESHOLD = 128  # luma (0-255) above which a pixel of a canny panel is an edge
MASK_THRESHOLD = 64  # brightest channel (0-255) above which a pixel of a mask panel is foreground
PANEL_TASKS = (Task.CANNY, Task.MASK)
SCORE_NAMES = dict(PANEL_KINDS)  # map kind -> score; the metric is ``panel_`` + the score name
PANEL_DIR = "panels"  # under the evaluation folder: scenes/, and one folder per model label
PANEL_BATCH = 4  # grids generated per sampler call


# --------------------------------------------------------------------------------------- scores
def edge_f1(pred: np.ndarray, truth: np.ndarray, tolerance: int = 1) -> float:
    """F1 of boolean edge maps: precision = share of predicted edge pixels within ``tolerance`` px
    (a (2·tolerance+1)² square) of a true edge, recall = share of true edge pixels within
    ``tolerance`` px of a predicted one. 1.0 when both maps are empty (they agree), 0.0 when only
    one is."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"edge maps differ in shape: {pred.shape} vs {truth.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, not {tolerance}")
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if n_pred == 0 or n_truth == 0:
        return 1.0 if n_pred == n_truth else 0.0
    square = np.ones((2 * tolerance + 1,) * 2, dtype=bool)
    near_truth = ndimage.binary_dilation(truth, square) if tolerance else truth
    near_pred = ndimage.binary_dilation(pred, square) if tolerance else pred
    precision = int((pred & near_truth).sum()) / n_pred
    recall = int((truth & near_pred).sum()) / n_truth
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two foreground maps (boolean, or images: non-zero / non-black is
    foreground). 1.0 when both are empty."""
    pred, truth = _foreground_of(pred), _foreground_of(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {truth.shape}")
    union = int((pred | truth).sum())
    return 1.0 if union == 0 else int((pred & truth).sum()) / union


def _foreground_of(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    return (array.max(axis=-1) if array.ndim == 3 else array) > 0


def edge_map(image: Image.Image | np.ndarray, threshold: int = EDGE_THRESHOLD) -> np.ndarray:
    """A canny panel's edges: luma (PIL's ``L``) > ``threshold``."""
    grey = np.asarray(_pil(image).convert("L"), dtype=np.uint8)
    return grey > threshold


def foreground(image: Image.Image | np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """A mask panel's foreground: brightest channel > ``threshold`` (the background is black)."""
    rgb = np.asarray(_pil(image).convert("RGB"), dtype=np.uint8)
    return rgb.max(axis=-1) > threshold


def _pil(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def score_panel(kind: str, generated: Image.Image, truth: Image.Image, tolerance: int = 1) -> float:
    """The score of a generated ``kind`` panel (``canny``: :func:`edge_f1`, ``mask``:
    :func:`mask_iou`) against its ground truth, both binarised the same way."""
    if generated.size != truth.size:
        generated = generated.resize(truth.size, Image.Resampling.BICUBIC)
    if kind == "canny":
        return edge_f1(edge_map(generated), edge_map(truth), tolerance)
    if kind == "mask":
        return mask_iou(foreground(generated), foreground(truth))
    raise ValueError(f"no panel score for {kind!r}; choose one of: {', '.join(SCORE_NAMES)}")


# --------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class PanelScene:
    """A held-out scene fitted to a ``side`` x ``side`` panel: its caption, the known image panel
    and the ground-truth maps (``canny``, ``mask``, ``depth``) at the panel's size."""

    index: int
    prompt: str
    image: Image.Image
    truth: dict[str, Image.Image]


def panel_side(height: int) -> int:
    """The panel side for an evaluation ``height``: half of it, rounded down to a multiple of 16
    (at least 16), so the ``2·side`` x ``side`` grid is as tall as the other evaluation images."""
    return max(PANEL_MULTIPLE, height // 2 // PANEL_MULTIPLE * PANEL_MULTIPLE)


def panel_scenes(n: int, size: int, side: int, seed: int = HELDOUT_SEED) -> list[PanelScene]:
    """``n`` held-out scenes rendered at ``size`` (as the synthetic suite renders them) and fitted
    to a ``side`` x ``side`` panel, with their ground-truth maps drawn in the panel's pixels."""
    from components.grids.ground_truth import fit_objects, ground_truth_maps
    from data_tools.synthetic import render_scene

    if side % PANEL_MULTIPLE or side <= 0:
        raise ValueError(f"panel side {side} must be a positive multiple of {PANEL_MULTIPLE}")
    scenes = []
    for item in synthetic_suite(n, size, seed):
        objects = item.metadata["objects"]
        image = fit_image(render_scene(objects, size), side, side)
        truth = ground_truth_maps(fit_objects(objects, (size, size), (side, side)), (side, side))
        scenes.append(PanelScene(item.index, item.prompt, image, truth))
    return scenes


# ------------------------------------------------------------------------------------ generation
@dataclass
class PanelResult:
    """Mean scores (``panel_canny_f1``, ``panel_mask_iou``) and one record per scene: ``index``,
    ``prompt``, ``scores`` (``canny_f1``, ``mask_iou``) and, when images were saved, ``image``,
    ``truth`` and ``generated`` (kind → path relative to the evaluation folder)."""

    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)


def panel_scores(
    sampler: LuminaSampler,
    config: EvalConfig,
    n: int,
    *,
    seed: int = HELDOUT_SEED,
    out_dir: str | Path | None = None,
    label: str = "after",
    progress: bool = False,
    scenes: Sequence[PanelScene] | None = None,
    tolerance: int = 1,
) -> PanelResult:
    """Generate the ``canny`` and ``mask`` panels of ``n`` held-out scenes (``seed``) with
    ``sampler`` and score them against the ground truth.

    Grids are ``upper-lower``, ``2·side`` x ``side`` with ``side = panel_side(config.height)``,
    sampled with ``config.sampler`` under Template C, noise seed ``config.seed`` (the same draws
    for every model, so two models' panels are paired). ``scenes`` overrides the rendered ones.
    With ``out_dir``, the scene images and ground truth are written under ``panels/scenes/`` and the
    generated panels under ``panels/<label>/``; the records name them relative to ``out_dir``."""
    side = panel_side(config.height)
    scenes = list(scenes) if scenes is not None else panel_scenes(n, config.height, side, seed)
    sampler_config = config.sampler.model_copy(update={"system_prompt": SystemPrompt.C})
    out = Path(out_dir) if out_dir is not None else None
    generated: dict[str, list[Image.Image]] = {task.kind: [] for task in PANEL_TASKS}
    chunks = [scenes[i : i + PANEL_BATCH] for i in range(0, len(scenes), PANEL_BATCH)]
    with tqdm(total=len(PANEL_TASKS) * len(chunks), desc=f"panels {label}", disable=not progress,
              leave=False) as bar:  # fmt: skip
        for task in PANEL_TASKS:
            for start, chunk in zip(range(0, len(scenes), PANEL_BATCH), chunks, strict=True):
                generated[task.kind] += _generate(
                    sampler, task, chunk, side, config.seed + start, sampler_config
                )
                bar.update()
    records, totals = [], {name: [] for name in SCORE_NAMES.values()}
    for i, scene in enumerate(scenes):
        scores = {}
        for kind, name in SCORE_NAMES.items():
            scores[name] = score_panel(kind, generated[kind][i], scene.truth[kind], tolerance)
            totals[name].append(scores[name])
        record: dict[str, Any] = {"index": scene.index, "prompt": scene.prompt, "scores": scores}
        if out is not None:
            record.update(_save(out, label, scene, {k: v[i] for k, v in generated.items()}))
        records.append(record)
    metrics = {f"panel_{name}": float(np.mean(v)) if v else float("nan") for name, v in totals.items()}
    return PanelResult(metrics, records)


def _generate(
    sampler: LuminaSampler, task: Task, scenes: Sequence[PanelScene], side: int, seed: int, config: Any
) -> list[Image.Image]:
    """The generated map panels of one batch of scenes (their image panels known): the batch form
    of :meth:`PanelCondition.from_image` (the images are already fitted to the panel)."""
    from model.vae import encode_images

    if not scenes:
        return []
    reference = encode_images(sampler.vae, [fit_image(s.image, side, side) for s in scenes])
    condition = PanelCondition(Layout.UPPER_LOWER, task, reference)
    result = sampler.generate(
        [s.prompt for s in scenes], height=2 * side, width=side, seed=seed, config=config, condition=condition
    )
    return list(result.images)


def _save(out: Path, label: str, scene: PanelScene, generated: dict[str, Image.Image]) -> dict[str, Any]:
    scene_dir, model_dir = out / PANEL_DIR / "scenes", out / PANEL_DIR / _safe(label)
    scene_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{scene.index:04d}"
    paths: dict[str, Any] = {"image": scene_dir / f"{stem}_image.png", "truth": {}, "generated": {}}
    if not paths["image"].is_file():
        scene.image.save(paths["image"])
    for kind in SCORE_NAMES:
        truth_path = scene_dir / f"{stem}_{kind}.png"
        if not truth_path.is_file():
            scene.truth[kind].save(truth_path)
        paths["truth"][kind] = truth_path
        paths["generated"][kind] = model_dir / f"{stem}_{kind}.png"
        generated[kind].save(paths["generated"][kind])
    return {
        "image": paths["image"].relative_to(out).as_posix(),
        "truth": {k: p.relative_to(out).as_posix() for k, p in paths["truth"].items()},
        "generated": {k: p.relative_to(out).as_posix() for k, p in paths["generated"].items()},
    }


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label) or "model"


def merge_records(
    after: Sequence[dict[str, Any]], before: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One record per scene for the report: ``index``, ``prompt``, ``image``, ``truth`` and, per
    model, ``after`` / ``before`` = ``{"generated": ..., "scores": ...}`` (``before`` only with a
    baseline). Scenes are matched by index."""
    theirs = {r["index"]: r for r in before or []}
    merged = []
    for record in after:
        row = {k: record[k] for k in ("index", "prompt", "image", "truth") if k in record}
        row["after"] = {"generated": record.get("generated", {}), "scores": record["scores"]}
        if record["index"] in theirs:
            other = theirs[record["index"]]
            row["before"] = {"generated": other.get("generated", {}), "scores": other["scores"]}
        merged.append(row)
    return merged
