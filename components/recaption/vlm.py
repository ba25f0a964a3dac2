"""The ``vlm`` captioning backend of UniCap: a Qwen2-VL-family captioner (``Qwen/Qwen2-VL-7B-Instruct``,
``U4R/OmniCaptioner``, ... or a local folder) asked for captions at four lengths and from the paper's
perspectives (style, main object, all objects, attributes, spatial relations, visible text), in two
languages, at native resolution.

Prompting: **two prompts per image per language** (one when no perspective is asked for). The first asks
for a JSON object with the four lengths (:data:`PROMPTS`), the second for a JSON object with the chosen
perspectives (:func:`perspective_prompt`; :data:`PERSPECTIVE_PROMPTS` with all six); keys in English,
values in the target language. Separate answers rather than one object with ten keys, for robustness:
each answer is shorter (less truncation at ``max_new_tokens``, one malformed or cut-off object loses
only its own keys), each parses on its own, and the required lengths never depend on the optional
perspectives — a captioner that garbles the perspective answer still delivers the lengths, and a slow
one can skip the perspectives (``perspectives=()``) without another prompt wording. The cost is one more
prefill of the image per language. A failure in one language does not lose the other either. The prompt
texts are versioned by :data:`PROMPT_VERSION` (change the version whenever the wording changes).

Native resolution: by default an image is resized only as far as the checkpoint's own pixel budget
(its image processor's ``max_pixels``, 12845056 = 16384 visual tokens of 28x28 px for the released
Qwen2-VL models), aspect ratio kept by the processor's ``smart_resize`` (sides multiples of 28);
``max_pixels`` sets a different cap (memory / speed).

The generated texts are read by :func:`components.recaption.parse.parse_captions` (only what can be read
is returned; :attr:`ImageCaptions.error` says which lengths are missing,
:attr:`ImageCaptions.perspective_error` which perspectives). A tiny random-weight Qwen2-VL for tests,
benchmarks and the offline profile is built by :mod:`components.recaption.tiny_vlm`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common.errors import error_summary
from components.recaption.parse import missing_message, parse_captions
from components.recaption.schema import CAPTION_KINDS, GRANULARITIES, LANGUAGES, PERSPECTIVES

__all__ = [
    "CAPTION_KINDS",
    "GRANULARITIES",
    "LANGUAGES",
    "PERSPECTIVES",
    "PERSPECTIVE_PROMPTS",
    "PROMPTS",
    "PROMPT_VERSION",
    "CaptionerError",
    "ImageCaptions",
    "VlmCaptioner",
    "perspective_prompt",
    "processor_pixel_budget",
]

PROMPT_VERSION = "unicap-v2"  # v2: perspective prompt; native resolution up to the processor's budget

_LANGUAGE_NAMES = {"en": "English", "zh": "Simplified Chinese (简体中文)"}
_PROMPT = (
    "Caption this image for a text-to-image training set. Reply with only one JSON object with exactly "
    'these four keys: "detailed" (a thorough paragraph: every subject with its attributes and count, '
    "spatial relations, any visible text, background, style, lighting and composition), "
    '"medium" (two or three sentences on the main subjects and setting), "short" (one sentence), '
    '"tag" (a JSON list of short keywords). Only describe what is visible. Write every value in {language}.'
)
PROMPTS: dict[str, str] = {lang: _PROMPT.format(language=name) for lang, name in _LANGUAGE_NAMES.items()}
"""The user prompt for the four lengths per caption language (version :data:`PROMPT_VERSION`)."""

_PERSPECTIVE_KEYS = {
    "style": '"style" (the visual style and medium, e.g. photograph, illustration, 3D render or painting, '
    "with its lighting, color palette and mood, in one or two sentences)",
    "main_object": '"main_object" (the main subject: what it is and how it looks, in one sentence)',
    "objects": '"objects" (a JSON list naming every visible object)',
    "attributes": '"attributes" (the attributes of the objects: color, shape, size, material, texture '
    "and count)",
    "spatial": '"spatial" (the spatial relations between the objects: where each one is and how they are '
    "placed relative to each other)",
    "ocr": '"ocr" (all visible text, transcribed verbatim, or "none" if the image shows no text)',
}
_PERSPECTIVE_PROMPT = (
    "Describe this image from several perspectives for a text-to-image training set. Reply with only one "
    "JSON object with exactly these keys: {keys}. Only describe what is visible. Write every value in "
    "{language}{ocr_note}."
)


def perspective_prompt(language: str, perspectives: Sequence[str] = PERSPECTIVES) -> str:
    """The user prompt asking for ``perspectives`` (a subset of :data:`PERSPECTIVES`) in ``language``."""
    keys = ", ".join(_PERSPECTIVE_KEYS[p] for p in PERSPECTIVES if p in perspectives)
    ocr_note = ', except "ocr", which keeps the text as written' if "ocr" in perspectives else ""
    return _PERSPECTIVE_PROMPT.format(keys=keys, language=_LANGUAGE_NAMES[language], ocr_note=ocr_note)


PERSPECTIVE_PROMPTS: dict[str, str] = {lang: perspective_prompt(lang) for lang in _LANGUAGE_NAMES}
"""The user prompt for all six perspectives per caption language (version :data:`PROMPT_VERSION`)."""

# Qwen2-VL: 14 px patches merged 2x2, so images are resized to multiples of 28 px.
PATCH_FACTOR = 28
DEFAULT_MIN_PIXELS = 4 * PATCH_FACTOR * PATCH_FACTOR  # 56 x 56
# The released Qwen2-VL processors' budget (preprocessor_config.json ``max_pixels``: 16384 visual
# tokens); used only when a processor states none.
RELEASED_MAX_PIXELS = 16384 * PATCH_FACTOR * PATCH_FACTOR  # 12845056
DEFAULT_MAX_NEW_TOKENS = 512


def processor_pixel_budget(image_processor: Any) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of a Qwen2-VL image processor, read from its config: ``min_pixels``
    / ``max_pixels`` (older transformers and the hub's ``preprocessor_config.json``) or
    ``size["shortest_edge"]`` / ``size["longest_edge"]`` (transformers >= 4.5x keeps them there)."""

    def read(*names: str) -> int | None:
        size = getattr(image_processor, "size", None)
        for name in names:
            value = getattr(image_processor, name, None)
            if value is None and size is not None:
                value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
            if value:
                return int(value)
        return None

    low = read("min_pixels", "shortest_edge") or DEFAULT_MIN_PIXELS
    high = read("max_pixels", "longest_edge") or RELEASED_MAX_PIXELS
    return low, high


class CaptionerError(RuntimeError):
    """The captioner cannot be loaded or used (one-line, user-facing message)."""


@dataclass
class ImageCaptions:
    """Captions of one image: ``captions[language][kind] = text``, a kind being one of the four lengths
    or one of the asked-for perspectives.

    Only parsed kinds are present. ``raw`` is the generated answer to the lengths prompt: with one
    language it is that text verbatim, with several it is one ``[lang]`` header line plus the text per
    language (the verbatim texts are in ``raw_by_language``; the perspective answers in
    ``raw_perspectives_by_language``). ``error`` is ``None`` only when every requested language has all
    four lengths; otherwise it says what is missing or why the image was not captioned.
    ``perspective_error`` says which asked-for perspectives are missing (``None``: all there, or none
    asked for); a missing perspective does not fail the image.
    """

    captions: dict[str, dict[str, str]]
    raw: str
    error: str | None = None
    raw_by_language: dict[str, str] = field(default_factory=dict)
    perspective_error: str | None = None
    raw_perspectives_by_language: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# The captioner


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No info logs or progress bars from transformers while loading/saving (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@lru_cache(maxsize=1)
def _image_only_processor_class() -> type:
    """A ``Qwen2VLProcessor`` without its video processor.

    ``Qwen2VLProcessor`` insists on a video processor, and transformers' video processors need
    torchvision, which this project does not install. Captioning only needs the image path (same
    prompt expansion: one ``<|image_pad|>`` per merged 2x2 patch), so this subclass drops the video
    attribute. It serves Qwen2.5-VL checkpoints (e.g. OmniCaptioner) too: their image path is the same.
    """
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen2VLImageOnlyProcessor


def _load_processor(source: str) -> Any:
    """``AutoProcessor`` when it loads (torchvision installed), else tokenizer + image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(source)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
    except OSError:  # missing folder / not on the hub / offline: nothing else will load either
        raise
    except Exception:  # e.g. no video processor without torchvision: assemble the image-only one
        pass
    tokenizer = AutoTokenizer.from_pretrained(source)
    image_processor = AutoImageProcessor.from_pretrained(source)
    template = getattr(tokenizer, "chat_template", None)
    return _image_only_processor_class()(image_processor, tokenizer, chat_template=template)


class VlmCaptioner:
    """Caption images with a Qwen2-VL-family model (hub id or local folder, loaded ``from_pretrained``).

    ``batch_size`` is the number of prompts per ``generate`` call; every image gives
    :attr:`prompts_per_image` prompts (one per language for the lengths, one more per language when
    ``perspectives`` is not empty), so ``caption(images)`` runs
    ``ceil(len(images) * prompts_per_image / batch_size)`` calls (prompts are ordered image by image,
    languages inside, the lengths prompt before the perspective prompt). Decoding is greedy
    (deterministic), with left padding. Images are converted to RGB and kept at native resolution,
    except that the processor resizes them (aspect ratio kept, sides multiples of 28) to at most
    ``max_pixels`` (default: the processor's own budget, :func:`processor_pixel_budget`) and at least
    ``min_pixels`` (default: the processor's own) pixels.
    """

    PROMPT_VERSION = PROMPT_VERSION

    def __init__(
        self,
        model: str | Path,
        *,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        batch_size: int = 4,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        languages: Sequence[str] = LANGUAGES,
        perspectives: Sequence[str] = PERSPECTIVES,
    ):
        if batch_size < 1:
            raise CaptionerError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise CaptionerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        floor = PATCH_FACTOR * PATCH_FACTOR
        given = [p for p in (min_pixels, max_pixels) if p is not None]
        if any(p < floor for p in given) or (len(given) == 2 and max_pixels < min_pixels):  # type: ignore[operator]
            raise CaptionerError(f"need {floor} <= min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        unknown = [lang for lang in languages if lang not in PROMPTS]
        if unknown or not languages:
            raise CaptionerError(
                f"languages must be a non-empty subset of {LANGUAGES}, got {list(languages)}"
            )
        bad = [p for p in perspectives if p not in PERSPECTIVES]
        if bad or len(set(perspectives)) != len(perspectives):
            raise CaptionerError(
                f"perspectives must be distinct names from {PERSPECTIVES}, got {list(perspectives)}"
            )
        self.model_id = str(model)
        self.prompt_version = PROMPT_VERSION
        self.languages = tuple(languages)
        self.perspectives = tuple(p for p in PERSPECTIVES if p in perspectives)  # canonical order
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.dtype = dtype or _default_dtype(self.device)
        self.generate_calls = 0  # statistics, for tests and benchmarks
        self.batch_rows: list[int] = []
        self.generated_tokens = 0
        self.processor, self.model = self._load(model)
        # native resolution: the processor's own budget unless a cap is set
        budget_min, budget_max = processor_pixel_budget(self.processor.image_processor)
        self.pixel_budget = budget_max
        self.max_pixels = max_pixels if max_pixels is not None else budget_max
        self.min_pixels = min_pixels if min_pixels is not None else min(budget_min, self.max_pixels)
        if self.min_pixels > self.max_pixels:
            raise CaptionerError(
                f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels} for {self.model_id!r}"
            )
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    def _load(self, model: str | Path) -> tuple[Any, torch.nn.Module]:
        from transformers import AutoModelForImageTextToText

        source = str(model)
        if isinstance(model, Path) or source.startswith((".", "/", "~")):
            path = Path(source).expanduser()
            if not path.is_dir():
                raise CaptionerError(f"cannot load VLM captioner {source!r}: no such model folder")
            source = str(path)
        try:
            with quiet_transformers():
                processor = _load_processor(source)
                net = AutoModelForImageTextToText.from_pretrained(source, dtype=self.dtype)
        except Exception as exc:  # OSError (missing/offline), ValueError (unknown architecture), ...
            raise CaptionerError(f"cannot load VLM captioner {source!r}: {error_summary(exc)}") from None
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise CaptionerError(f"cannot load VLM captioner {source!r}: it has no image processor/tokenizer")
        template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
        if not template:
            raise CaptionerError(f"cannot load VLM captioner {source!r}: it has no chat template")
        processor.chat_template = template
        return processor, net.to(self.device).eval()

    # -- prompts -------------------------------------------------------------------------------

    @property
    def prompt_kinds(self) -> tuple[str, ...]:
        """``("lengths", "perspectives")``, or ``("lengths",)`` when no perspective is asked for."""
        return ("lengths", "perspectives") if self.perspectives else ("lengths",)

    @property
    def prompts_per_image(self) -> int:
        """Prompts (``generate`` rows) per image: one per language and prompt kind."""
        return len(self.languages) * len(self.prompt_kinds)

    def instruction(self, language: str, kind: str = "lengths") -> str:
        """The user instruction of a prompt kind (``lengths`` | ``perspectives``) in a language."""
        if kind == "lengths":
            return PROMPTS[language]
        if kind == "perspectives":
            return perspective_prompt(language, self.perspectives)
        raise ValueError(f"unknown prompt kind {kind!r}")

    def build_prompt(self, language: str, kind: str = "lengths") -> str:
        """The chat-formatted prompt (one image placeholder, then the instruction) for a language."""
        content = [{"type": "image"}, {"type": "text", "text": self.instruction(language, kind)}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def preprocess(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Any:
        """Processor inputs (left-padded ``input_ids``, ``pixel_values``, ``image_grid_thw``, ...)."""
        return self.processor(
            text=list(prompts),
            images=list(images),
            padding=True,
            return_tensors="pt",
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
        )

    # -- captioning ----------------------------------------------------------------------------

    @staticmethod
    def _to_rgb(image: Image.Image) -> Image.Image:
        if image.width < 1 or image.height < 1:
            raise ValueError(f"empty image {image.width}x{image.height}")
        if max(image.size) / min(image.size) > 200:
            raise ValueError(f"aspect ratio above 200 ({image.width}x{image.height})")
        if image.mode == "RGB":
            return image
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")

    @torch.inference_mode()
    def _generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        inputs = self.preprocess(images, prompts).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        self.generate_calls += 1
        self.batch_rows.append(len(prompts))
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self._pad_id,
        )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        self.generated_tokens += int((new_tokens != self._pad_id).sum())
        texts = self.processor.batch_decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return [t.strip() for t in texts]

    def caption(self, images: Sequence[Image.Image]) -> list[ImageCaptions]:
        """Captions for each image, in order (one :class:`ImageCaptions` per image)."""
        results: list[ImageCaptions | None] = [None] * len(images)
        rgb: dict[int, Image.Image] = {}
        for i, image in enumerate(images):
            try:
                rgb[i] = self._to_rgb(image)
            except Exception as exc:  # unreadable/degenerate image: report it, caption the others
                results[i] = ImageCaptions({}, "", f"image not captioned: {error_summary(exc)}")
        work = [(i, lang, kind) for i in rgb for lang in self.languages for kind in self.prompt_kinds]
        prompts = {(lang, kind): self.build_prompt(lang, kind) for _, lang, kind in work}
        raw: dict[int, dict[tuple[str, str], str]] = {i: {} for i in rgb}
        for start in range(0, len(work), self.batch_size):
            chunk = work[start : start + self.batch_size]
            texts = self._generate(
                [rgb[i] for i, _, _ in chunk], [prompts[lang, kind] for _, lang, kind in chunk]
            )
            for (i, lang, kind), text in zip(chunk, texts, strict=True):
                raw[i][lang, kind] = text
        for i, answers in raw.items():
            results[i] = self._read(answers)
        return [r for r in results if r is not None]

    def _read(self, answers: dict[tuple[str, str], str]) -> ImageCaptions:
        """One image's captions from its answers ``{(language, prompt kind): text}``."""
        captions: dict[str, dict[str, str]] = {}
        for (lang, kind), text in answers.items():
            kinds = GRANULARITIES if kind == "lengths" else self.perspectives
            if parsed := parse_captions(text, kinds):
                captions.setdefault(lang, {}).update(parsed)
        lengths = {lang: answers[lang, "lengths"] for lang in self.languages}
        views = {lang: answers[lang, "perspectives"] for lang in self.languages if self.perspectives}
        if len(self.languages) == 1:
            raw_text = lengths[self.languages[0]]
        else:
            raw_text = "\n".join(f"[{lang}]\n{lengths[lang]}" for lang in self.languages)
        return ImageCaptions(
            captions=captions,
            raw=raw_text,
            error=missing_message(captions, self.languages),
            raw_by_language=lengths,
            perspective_error=(
                missing_message(captions, self.languages, self.perspectives) if self.perspectives else None
            ),
            raw_perspectives_by_language=views,
        )

    def __repr__(self) -> str:
        return (
            f"VlmCaptioner(model_id={self.model_id!r}, prompt_version={PROMPT_VERSION!r}, "
            f"languages={self.languages}, perspectives={self.perspectives}, batch_size={self.batch_size}, "
            f"max_pixels={self.max_pixels})"
        )
