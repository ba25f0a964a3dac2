"""OCR text density: fraction of the image area covered by text that PP-OCRv6 (rapidocr +
onnxruntime, models bundled with rapidocr) finds and reads, 0 .. 1, lower is better."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import WeightsNotFoundError
from components.tier.registry import Scorer
from components.tier.scorers.shared import bounded, dist_version, has_module, onnx_threads, package_dir

OCR_SIDE = 384
"""The text detector sees at most this longest side (about 3x faster than 512; text a few pixels
high is still found, and small text hardly changes the covered fraction)."""


_OCR_MODELS = ("PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx")  # bundled with rapidocr


def _ocr_model_paths() -> tuple[Path, Path] | None:
    folder = package_dir("rapidocr")
    paths = tuple(folder / "models" / name for name in _OCR_MODELS) if folder else ()
    return paths if paths and all(p.is_file() for p in paths) else None  # type: ignore[return-value]


@functools.cache
def _ocr_engine():
    from rapidocr import RapidOCR

    paths = _ocr_model_paths()
    if paths is None:
        raise WeightsNotFoundError(f"rapidocr's bundled models ({', '.join(_OCR_MODELS)}) not found")
    return RapidOCR(
        params={
            "Global.use_cls": False,
            "Global.log_level": "error",
            "Det.model_path": str(paths[0]),
            "Det.limit_type": "max",
            "Det.limit_side_len": OCR_SIDE,
            "Rec.model_path": str(paths[1]),
            "EngineConfig.onnxruntime.intra_op_num_threads": onnx_threads(),
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
    )


def text_boxes(image: Image.Image) -> tuple[np.ndarray, list[str], tuple[int, int]]:
    """Text found in the bounded image: quadrilaterals (n, 4, 2) in its pixel coordinates, their
    texts, and its size. A box counts only when the recogniser reads it (score >= 0.5) as
    something with a letter or digit: the detector alone also fires on large solid shapes."""
    rgb = np.asarray(bounded(image))
    out = _ocr_engine()(np.ascontiguousarray(rgb[:, :, ::-1]), use_det=True, use_cls=False, use_rec=True)
    boxes, texts = getattr(out, "boxes", None), getattr(out, "txts", None)
    keep = [i for i, t in enumerate(texts or ()) if any(c.isalnum() for c in t)] if boxes is not None else []
    kept = np.asarray(boxes, dtype=np.float32)[keep] if keep else np.zeros((0, 4, 2), np.float32)
    return kept, [texts[i] for i in keep], (rgb.shape[1], rgb.shape[0])


def text_density(image: Image.Image, row: dict) -> float:
    """Fraction of the image area covered by readable text (union of the boxes), 0 .. 1."""
    import cv2

    boxes, _, (w, h) = text_boxes(image)
    if not len(boxes):
        return 0.0
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(b).astype(np.int32) for b in boxes], 1)
    return float(mask.mean())


def scorers() -> list[Scorer]:
    """Text density where onnxruntime, cv2 and rapidocr (with its bundled models) are installed."""
    if not (has_module("onnxruntime") and has_module("cv2") and _ocr_model_paths() is not None):
        return []
    return [
        Scorer(
            "text_density",
            f"1+rapidocr-{dist_version('rapidocr')}-ppocrv6-det-rec",
            text_density,
            higher_is_better=False,
            description="fraction of the image covered by readable text",
        )
    ]
