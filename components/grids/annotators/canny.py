"""Canny edges (OpenCV): white edges on black, the ControlNet canny condition (thresholds 100 / 200)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from components.grids.annotators.registry import Annotator

NAME = "canny"
LOW, HIGH = 100, 200


def canny(image: Image.Image, low: int = LOW, high: int = HIGH) -> Image.Image:
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return Image.fromarray(cv2.Canny(gray, low, high)).convert("RGB")


def offer(source: str | None = None) -> Annotator:
    return Annotator(NAME, f"1+opencv-{cv2.__version__}", "canny", canny, description="Canny edges 100/200")
