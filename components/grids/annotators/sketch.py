"""Pencil sketch (OpenCV): dark strokes on white, by colour-dodging the grey image with its blurred
negative (the classic pencil-sketch filter), then lightly sharpened by a contrast stretch."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from components.grids.annotators.registry import Annotator

NAME = "sketch"


def sketch(image: Image.Image) -> Image.Image:
    rgb = np.asarray(image.convert("RGB"))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    side = max(3, (min(gray.shape) // 24) | 1)  # odd blur kernel, ~4% of the short side
    blurred = cv2.GaussianBlur(255 - gray, (side, side), 0)
    dodge = cv2.divide(gray, 255 - blurred, scale=256)  # near 255 on flat areas, dark at edges
    stretched = cv2.normalize(dodge, None, 0, 255, cv2.NORM_MINMAX) if dodge.min() < 255 else dodge
    return Image.fromarray(stretched.astype(np.uint8)).convert("RGB")


def offer(source: str | None = None) -> Annotator:
    return Annotator(NAME, f"1+opencv-{cv2.__version__}", "sketch", sketch, description="pencil sketch")
