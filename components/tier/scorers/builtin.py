"""Built-in image and caption quality scorers (numpy/scipy, no weights): resolution, sharpness
(variance of the Laplacian), exposure (distance of mean luminance from mid-grey, clipped
highlights/shadows), contrast (luminance std), colorfulness (Hasler & Süsstrunk), caption richness
(length of the longest caption per language, CJK counted by characters)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from components.recaption.schema import PERSPECTIVES
from components.tier.captions import caption_list, caption_units
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
    """Mean over the image's caption languages of its longest caption's :func:`caption_units`
    (0 without captions); only the length granularities count, not the UniCap perspectives.

    The raw value is only comparable among images captioned by the same source in the same
    languages (a VLM writes longer captions than alt text or metadata, and Chinese has more
    characters than English has words): the tier step ranks it within those groups
    (:func:`components.tier.tiering.ranking_groups`), never across them."""
    longest: dict[str, int] = {}
    for cap in caption_list(row.get("captions")):
        if cap.get("granularity") in PERSPECTIVES:  # UniCap perspectives are not caption lengths
            continue
        lang = str(cap.get("language") or "")
        longest[lang] = max(longest.get(lang, 0), caption_units(str(cap["text"])))
    return float(np.mean(list(longest.values()))) if longest else 0.0


def scorers() -> list[Scorer]:
    """Always available: nothing to load."""
    return [
        Scorer("resolution", "1", resolution, description="megapixels"),
        Scorer("sharpness", "1", sharpness, description="variance of the Laplacian"),
        Scorer("exposure", "1", exposure, description="balanced mean luminance, few clipped pixels"),
        Scorer("contrast", "1", contrast, description="luminance standard deviation"),
        Scorer("colorfulness", "1", colorfulness, description="Hasler & Süsstrunk 2003"),
        Scorer(
            "caption_richness",
            "2",
            caption_richness,
            description="longest caption per language in words (CJK by characters), mean over languages",
        ),
    ]
