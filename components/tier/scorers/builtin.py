"""Built-in image and caption quality scorers (numpy/scipy, no weights): resolution, sharpness
(variance of the Laplacian), exposure (distance of mean luminance from mid-grey, clipped
highlights/shadows), contrast (luminance std), colorfulness (Hasler & Süsstrunk), caption richness
(words and languages over the captions)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from scipy import ndimage

from components.tier.registry import Scorer


def _luma(image: Image.Image, max_side: int = 512) -> np.ndarray:
    gray = image.convert("L")
    if max(gray.size) > max_side:  # scores on a bounded size: comparable and fast
        gray = gray.copy()
        gray.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / 255.0


def resolution(image: Image.Image, row: dict) -> float:
    """Megapixels of the original file (from the manifest when known)."""
    width, height = row.get("width") or image.width, row.get("height") or image.height
    return width * height / 1e6


def sharpness(image: Image.Image, row: dict) -> float:
    return float(ndimage.laplace(_luma(image)).var())


def exposure(image: Image.Image, row: dict) -> float:
    """1 for a balanced exposure, lower for dark/bright images and clipped pixels."""
    luma = _luma(image)
    clipped = float(((luma < 0.02) | (luma > 0.98)).mean())
    return float(1.0 - 2.0 * abs(luma.mean() - 0.5)) * (1.0 - clipped)


def contrast(image: Image.Image, row: dict) -> float:
    return float(_luma(image).std())


def colorfulness(image: Image.Image, row: dict) -> float:
    rgb = np.asarray(image.convert("RGB").resize((256, 256)), dtype=np.float32)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def caption_richness(image: Image.Image, row: dict) -> float:
    """Words in the longest caption x number of languages captioned (0 without captions)."""
    caps = json.loads(row.get("captions") or "[]")
    if not caps:
        return 0.0
    longest = max(len(c["text"].split()) if c["language"] != "zh" else len(c["text"]) / 2 for c in caps)
    return float(longest * len({c["language"] for c in caps}))


def scorers() -> list[Scorer]:
    """Always available: nothing to load."""
    return [
        Scorer("resolution", "1", resolution, description="megapixels"),
        Scorer("sharpness", "1", sharpness, description="variance of the Laplacian"),
        Scorer("exposure", "1", exposure, description="balanced mean luminance, few clipped pixels"),
        Scorer("contrast", "1", contrast, description="luminance standard deviation"),
        Scorer("colorfulness", "1", colorfulness, description="Hasler & Süsstrunk 2003"),
        Scorer("caption_richness", "1", caption_richness, description="caption words x languages"),
    ]
