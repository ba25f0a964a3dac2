"""Helpers the model-based scorers share: finding a package (and the model it bundles) without
importing it, its version, the ONNX thread count, the bounded image size, and the AGGD shape grid
of BRISQUE and NIQE."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import special

MAX_SIDE = 512
"""Images are downscaled (aspect kept) to this longest side before the image scorers run."""


def has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing (and so running) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def onnx_threads() -> int:
    """Intra-op threads for the ONNX models (``LUMINA_SCORER_THREADS``, default min(4, cores))."""
    return int(os.environ.get("LUMINA_SCORER_THREADS") or min(4, os.cpu_count() or 1))


def bounded(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    return image


GAMMA_GRID = np.arange(0.2, 10.0, 0.001)  # candidate AGGD shapes, and their moment ratios:
R_GAMMA = special.gamma(2.0 / GAMMA_GRID) ** 2 / (
    special.gamma(1.0 / GAMMA_GRID) * special.gamma(3.0 / GAMMA_GRID)
)
