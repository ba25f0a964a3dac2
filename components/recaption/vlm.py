"""The ``vlm`` captioning backend of UniCap: a Qwen2-VL-family captioner (``Qwen/Qwen2-VL-7B-Instruct``,
``U4R/OmniCaptioner``, ... or a local folder) asked for captions at four granularities, in two languages.

Prompting: **one prompt per image per language**. Each prompt asks for a single JSON object with the four
granularities (keys in English, values in the target language), so every generated text parses on its own
and a failure in one language does not lose the other. The prompt texts are :data:`PROMPTS`, versioned by
:data:`PROMPT_VERSION` (change the version whenever the wording changes).

The generated texts are read by :func:`components.recaption.parse.parse_captions` (only what can be read
is returned; :attr:`ImageCaptions.error` says what is missing). A tiny random-weight Qwen2-VL for tests,
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
from components.recaption.schema import GRANULARITIES, LANGUAGES

__all__ = [
    "GRANULARITIES",
    "LANGUAGES",
    "PROMPTS",
    "PROMPT_VERSION",
    "CaptionerError",
    "ImageCaptions",
    "VlmCaptioner",
]

PROMPT_VERSION = "unicap-v1"

_LANGUAGE_NAMES = {"en": "English", "zh": "Simplified Chinese (简体中文)"}
_PROMPT = (
    "Caption this image for a text-to-image training set. Reply with only one JSON object with exactly "
    'these four keys: "detailed" (a thorough paragraph: every subject with its attributes and count, '
    "spatial relations, any visible text, background, style, lighting and composition), "
    '"medium" (two or three sentences on the main subjects and setting), "short" (one sentence), '
    '"tag" (a JSON list of short keywords). Only describe what is visible. Write every value in {language}.'
)
PROMPTS: dict[str, str] = {lang: _PROMPT.format(language=name) for lang, name in _LANGUAGE_NAMES.items()}
"""The user prompt per caption language (version :data:`PROMPT_VERSION`)."""

# Qwen2-VL: 14 px patches merged 2x2, so images are resized to multiples of 28 px.
PATCH_FACTOR = 28
DEFAULT_MIN_PIXELS = 4 * PATCH_FACTOR * PATCH_FACTOR  # 56 x 56
DEFAULT_MAX_PIXELS = 640 * PATCH_FACTOR * PATCH_FACTOR  # <= 640 visual tokens (~ 708 x 708)
DEFAULT_MAX_NEW_TOKENS = 512


class CaptionerError(RuntimeError):
    """The captioner cannot be loaded or used (one-line, user-facing message)."""


@dataclass
class ImageCaptions:
    """Captions of one image: ``captions[language][granularity] = text``.

    Only parsed granularities are present. ``raw`` is the generated text: with one language it is that
    text verbatim, with several it is one ``[lang]`` header line plus the text per language (the
    verbatim texts are in ``raw_by_language``). ``error`` is ``None`` only when every requested language
    has all four granularities; otherwise it says what is missing or why the image was not captioned.
    """

    captions: dict[str, dict[str, str]]
    raw: str
    error: str | None = None
    raw_by_language: dict[str, str] = field(default_factory=dict)


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

    ``batch_size`` is the number of prompts per ``generate`` call; every image gives one prompt per
    language, so ``caption(images)`` runs ``ceil(len(images) * len(languages) / batch_size)`` calls
    (prompts are ordered image by image, languages inside). Decoding is greedy (deterministic), with
    left padding. Images are converted to RGB and kept at native resolution, except that the
    processor resizes them (aspect ratio kept, sides multiples of 28) to at most ``max_pixels`` and
    at least ``min_pixels`` pixels.
    """

    PROMPT_VERSION = PROMPT_VERSION

    def __init__(
        self,
        model: str | Path,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        batch_size: int = 4,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        languages: Sequence[str] = LANGUAGES,
    ):
        if batch_size < 1:
            raise CaptionerError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise CaptionerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if min_pixels < PATCH_FACTOR * PATCH_FACTOR or max_pixels < min_pixels:
            floor = PATCH_FACTOR * PATCH_FACTOR
            raise CaptionerError(f"need {floor} <= min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        unknown = [lang for lang in languages if lang not in PROMPTS]
        if unknown or not languages:
            raise CaptionerError(
                f"languages must be a non-empty subset of {LANGUAGES}, got {list(languages)}"
            )
        self.model_id = str(model)
        self.prompt_version = PROMPT_VERSION
        self.languages = tuple(languages)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.device = torch.device(device)
        self.dtype = dtype or _default_dtype(self.device)
        self.generate_calls = 0  # statistics, for tests and benchmarks
        self.batch_rows: list[int] = []
        self.generated_tokens = 0
        self.processor, self.model = self._load(model)
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

    def build_prompt(self, language: str) -> str:
        """The chat-formatted prompt (one image placeholder, then the instruction) for a language."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[language]}]}
        ]
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
        work = [(i, lang) for i in rgb for lang in self.languages]
        prompts = {lang: self.build_prompt(lang) for lang in self.languages}
        raw: dict[int, dict[str, str]] = {i: {} for i in rgb}
        for start in range(0, len(work), self.batch_size):
            chunk = work[start : start + self.batch_size]
            texts = self._generate([rgb[i] for i, _ in chunk], [prompts[lang] for _, lang in chunk])
            for (i, lang), text in zip(chunk, texts, strict=True):
                raw[i][lang] = text
        for i, by_lang in raw.items():
            captions = {lang: parsed for lang, text in by_lang.items() if (parsed := parse_captions(text))}
            if len(self.languages) == 1:
                raw_text = by_lang[self.languages[0]]
            else:
                raw_text = "\n".join(f"[{lang}]\n{by_lang[lang]}" for lang in self.languages)
            results[i] = ImageCaptions(
                captions=captions,
                raw=raw_text,
                error=missing_message(captions, self.languages),
                raw_by_language=dict(by_lang),
            )
        return [r for r in results if r is not None]

    def __repr__(self) -> str:
        return (
            f"VlmCaptioner(model_id={self.model_id!r}, prompt_version={PROMPT_VERSION!r}, "
            f"languages={self.languages}, batch_size={self.batch_size}, max_pixels={self.max_pixels})"
        )
