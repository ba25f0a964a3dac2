"""BRISQUE (Mittal et al. 2012): 0 (best) .. 100 (worst), lower is better.

OpenCV's LIVE SVR model (``brisque_model_live.yml``, ``brisque_range_live.yml``, shipped in
:data:`BUNDLED_DIR`, see the NOTICE there) run through ``cv2.ml`` on features computed here with
numpy/cv2 bit-equal to opencv-contrib's ``cv2.quality.QualityBRISQUE`` (contrib itself is not
used: it and rapidocr's opencv-python-headless would both install ``cv2``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import special

from common.errors import WeightsNotFoundError
from components.tier.registry import Scorer
from components.tier.scorers.shared import GAMMA_GRID, R_GAMMA, bounded, dist_version, has_module

BRISQUE_FILES = ("brisque_model_live.yml", "brisque_range_live.yml")
BUNDLED_DIR = Path(__file__).resolve().parent / "brisque_model"
"""The model files as opencv_contrib ships them (``modules/quality/samples``), in this package."""
BRISQUE_DIR_ENV = "LUMINA_BRISQUE_DIR"
BRISQUE_MIN_SIDE = 8


def brisque_model_dir() -> Path:
    """Folder holding OpenCV's BRISQUE model files: ``LUMINA_BRISQUE_DIR`` when set, else the copy
    bundled with this package (:data:`BUNDLED_DIR`). Nothing is downloaded. Raises
    :class:`WeightsNotFoundError` naming the folder when it lacks a file."""
    given = os.environ.get(BRISQUE_DIR_ENV)
    folder = Path(given) if given else BUNDLED_DIR
    missing = [name for name in BRISQUE_FILES if not (folder / name).is_file()]
    if missing:
        where = f"{BRISQUE_DIR_ENV}={given}" if given else "the folder bundled with the package"
        raise WeightsNotFoundError(
            f"BRISQUE model file(s) {', '.join(missing)} not found in {folder} ({where}); "
            f"set {BRISQUE_DIR_ENV} to a folder holding {' and '.join(BRISQUE_FILES)}, or unset it "
            "to use the bundled copy"
        )
    return folder


def _files_present() -> bool:
    try:
        brisque_model_dir()
        return True
    except WeightsNotFoundError:
        return False


@functools.cache
def _brisque_model():
    import cv2

    folder = brisque_model_dir()
    svm = cv2.ml.SVM_load(str(folder / BRISQUE_FILES[0]))
    storage = cv2.FileStorage(str(folder / BRISQUE_FILES[1]), cv2.FILE_STORAGE_READ)
    bounds = storage.getNode("range").mat().astype(np.float32)  # row 0: minima, row 1: maxima
    storage.release()
    if svm is None or svm.empty() or bounds.shape != (2, 36):
        raise WeightsNotFoundError(f"BRISQUE model files in {folder} could not be read")
    return svm, bounds


def _aggd_fit(x: np.ndarray) -> tuple[float, float, float]:
    """(shape, left sigma, right sigma) of an asymmetric generalized Gaussian fit, by moment matching."""
    x = x.astype(np.float64).ravel()
    neg, pos = x[x < 0], x[x > 0]
    lsigma = np.sqrt(np.mean(neg**2)) if neg.size else 0.0
    rsigma = np.sqrt(np.mean(pos**2)) if pos.size else 0.0
    mean_sq = np.mean(x**2)
    if lsigma == 0 or rsigma == 0:  # flat or one-sided: undefined (NaN), as in the reference code
        return float("nan"), float(lsigma), float(rsigma)
    ghat = lsigma / rsigma
    rhat = np.mean(np.abs(x)) ** 2 / mean_sq
    rhatnorm = rhat * (ghat**3 + 1) * (ghat + 1) / (ghat**2 + 1) ** 2
    return float(GAMMA_GRID[np.argmin(np.abs(R_GAMMA - rhatnorm))]), float(lsigma), float(rsigma)


def _shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[i, j] = x[i + dy, j + dx]``, zero outside."""
    out = np.zeros_like(x)
    h, w = x.shape
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = x[
        max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


def brisque_features(gray: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of a grayscale image in [0, 1] (float32), as OpenCV-contrib computes them."""
    import cv2

    feats: list[float] = []
    for scale in (1, 2):
        h, w = gray.shape
        img = cv2.resize(gray, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC) if scale > 1 else gray
        mu = cv2.GaussianBlur(img, (7, 7), 7 / 6, borderType=cv2.BORDER_REPLICATE)
        var = cv2.GaussianBlur(img * img, (7, 7), 7 / 6, borderType=cv2.BORDER_REPLICATE) - mu * mu
        # OpenCV's sqrt of a (rounding-)negative variance is NaN, and its AGGD fit then counts that
        # pixel as 0: same here, so the scores match cv2.quality.QualityBRISQUE.
        with np.errstate(invalid="ignore"):
            mscn = np.nan_to_num((img - mu) / (np.sqrt(var) + np.float32(1 / 255)), nan=0.0)
        shape, lsig, rsig = _aggd_fit(mscn)
        feats += [shape, (lsig**2 + rsig**2) / 2]
        for dy, dx in ((0, 1), (1, 0), (1, 1), (-1, 1)):  # H, V, D1, D2 neighbours
            shape, lsig, rsig = _aggd_fit(mscn * _shifted(mscn, dy, dx))
            g1, g2, g3 = special.gamma(1 / shape), special.gamma(2 / shape), special.gamma(3 / shape)
            feats += [shape, (rsig - lsig) * (g2 / g1) * np.sqrt(g1) / np.sqrt(g3), lsig**2, rsig**2]
    return np.asarray(feats, dtype=np.float32)


def brisque(image: Image.Image, row: dict) -> float:
    """BRISQUE, 0 (best) .. 100 (worst), clamped as OpenCV does. A flat image has no statistics to
    fit, a tiny one no half scale: ``ValueError`` (the tier step reports the image as not scored)."""
    import cv2

    svm, bounds = _brisque_model()
    rgb = np.asarray(bounded(image))
    if min(rgb.shape[:2]) < BRISQUE_MIN_SIDE:
        raise ValueError(
            f"BRISQUE needs at least {BRISQUE_MIN_SIDE} px a side, got {rgb.shape[1]}x{rgb.shape[0]}"
        )
    # 8-bit grey times float32(1/255), exactly as OpenCV's convertTo: in flat areas BRISQUE feeds on
    # rounding residues, so even the last bit of the input matters for bit-equal features.
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) * np.float32(1 / 255)
    feats = brisque_features(gray)
    if not np.isfinite(feats).all():
        raise ValueError("BRISQUE is undefined for a flat image")
    scaled = -1 + 2 * (feats - bounds[0]) / (bounds[1] - bounds[0])
    value = float(svm.predict(scaled[None, :].astype(np.float32))[1].ravel()[0])
    return float(np.clip(value, 0.0, 100.0))


def scorers() -> list[Scorer]:
    """BRISQUE where cv2 is installed and the model files are at hand."""
    if not (has_module("cv2") and _files_present()):
        return []
    return [
        Scorer(
            "brisque",
            f"1+opencv-live-svr+cv{dist_version('opencv-python-headless')}",
            brisque,
            higher_is_better=False,
            description="BRISQUE 0 (best) .. 100, OpenCV LIVE model",
            prepare=brisque_model_dir,
        )
    ]
