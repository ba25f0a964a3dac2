"""Human pose maps from a ViTPose keypoint model (``VitPoseForPoseEstimation``), given by
``LUMINA_POSE_MODEL`` or ``GridConfig.weights["pose"]``.

ViTPose is a top-down estimator (it expects person boxes from a detector); with no detector here the
whole image is the one person box, which suits the person-centred photos a pose grid is made from.
The map draws the COCO-17 skeleton (OpenPose-style coloured limbs and joints on black) for the
keypoints scored at least :data:`MIN_SCORE`; a model with other keypoints gets its joints only."""

from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw

from components.grids.annotators.models import load, offer_model
from components.grids.annotators.registry import Annotator

NAME = "pose"
MODEL_CLASS = "VitPoseForPoseEstimation"
MIN_SCORE = 0.3
# COCO-17: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles (left before right).
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip


def _colour(i: int, n: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(i / max(n, 1), 1.0, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_pose(size: tuple[int, int], keypoints, scores, min_score: float = MIN_SCORE) -> Image.Image:
    """The skeleton of one person (``keypoints``: (K, 2) x/y pixels, ``scores``: (K,)) on black."""
    canvas = Image.new("RGB", size)
    draw = ImageDraw.Draw(canvas)
    width = max(2, min(size) // 64)
    seen = [float(s) >= min_score for s in scores]
    points = [(float(x), float(y)) for x, y in keypoints]
    if len(points) == 17:
        for i, (a, b) in enumerate(COCO_SKELETON):
            if seen[a] and seen[b]:
                draw.line([points[a], points[b]], fill=_colour(i, len(COCO_SKELETON)), width=width)
    for i, (x, y) in enumerate(points):
        if seen[i]:
            draw.ellipse((x - width, y - width, x + width, y + width), fill=_colour(i, len(points)))
    return canvas


def pose_map(source: str, image: Image.Image, min_score: float = MIN_SCORE) -> Image.Image:
    import torch

    processor, model = load(source, MODEL_CLASS)
    boxes = [[[0.0, 0.0, float(image.width), float(image.height)]]]  # COCO x, y, w, h: the whole image
    inputs = processor(image, boxes=boxes, return_tensors="pt").to(model.device)
    extra = {}
    if getattr(model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose+ (MoE): the COCO expert
        extra["dataset_index"] = torch.zeros(1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        outputs = model(**inputs, **extra)
    person = processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
    return draw_pose(
        image.size, person["keypoints"].cpu().tolist(), person["scores"].cpu().tolist(), min_score
    )


def offer(source: str | None) -> Annotator | str:
    description = "ViTPose keypoints (whole image as the person box), COCO skeleton"
    return offer_model(NAME, "pose", source, MODEL_CLASS, pose_map, description)
