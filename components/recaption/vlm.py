"""The ``vlm`` captioning backend of UniCap: a Qwen2-VL-family captioner (``Qwen/Qwen2-VL-7B-Instruct``,
``U4R/OmniCaptioner``, ... or a local folder) asked for captions at four granularities, in two languages.

Prompting: **one prompt per image per language**. Each prompt asks for a single JSON object with the four
granularities (keys in English, values in the target language), so every generated text parses on its own
and a failure in one language does not lose the other. The prompt texts are :data:`PROMPTS`, versioned by
:data:`PROMPT_VERSION` (change the version whenever the wording changes).

Honesty: the parser only returns what it can read from the model output. A granularity that cannot be
parsed is absent (never invented), and :attr:`ImageCaptions.error` says what is missing. A random-weight
model (:func:`build_tiny_qwen2vl`, for tests and the offline profile) produces gibberish, so it
normally yields empty captions and an error message; that is expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common.errors import error_summary
from components.recaption.schema import GRANULARITIES, LANGUAGES

__all__ = ["GRANULARITIES", "LANGUAGES", "PROMPT_VERSION", "CaptionerError", "VlmCaptioner", "parse_captions"]

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

# The Qwen2-VL chat template (as shipped with Qwen/Qwen2-VL-*-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


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
# Parsing


_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
# A complete JSON string: "..." with escapes.
_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_PAIR_STRING = re.compile(rf"({_JSON_STRING})\s*:\s*({_JSON_STRING})", re.DOTALL)
_PAIR_LIST = re.compile(
    rf"({_JSON_STRING})\s*:\s*(\[\s*(?:{_JSON_STRING}(?:\s*,\s*{_JSON_STRING})*\s*)?\])", re.DOTALL
)
_LABEL = re.compile(
    r"^\s*(?:[-*•>#]+\s*|\d+[.)]\s*)?(?:\*\*|__)?\s*"
    r"(?P<label>detailed|detail|medium|short|tags?)(?:[ _-]*(?:caption|description))?"
    r"\s*(?:\*\*|__)?\s*[:：]\s*(?:\*\*|__)?\s*(?P<rest>.*)$",
    re.IGNORECASE,
)
_TAG_SPLIT = re.compile(r"\s*[,，、;；\n]\s*")
_KEY_ALIASES = {"detail": "detailed", "tags": "tag"}


def _granularity(key: Any) -> str | None:
    """Map a key like ``"Detailed"``, ``"short_caption"`` or ``"tags"`` to a known granularity."""
    if not isinstance(key, str):
        return None
    k = re.sub(r"[\s_-]+", " ", key.strip().lower())
    k = re.sub(r" (caption|description)$", "", k)
    k = _KEY_ALIASES.get(k, k)
    return k if k in GRANULARITIES else None


def _clean_text(text: str) -> str:
    text = text.strip()
    for left, right in ('""', "''", "“”", "「」"):
        if len(text) >= 2 and text[0] == left and text[-1] == right:
            return text[1:-1].strip()
    return text


def _clean_tags(value: Any) -> str:
    if isinstance(value, str):
        items = _TAG_SPLIT.split(value.strip().strip("[]"))
    else:
        items = [v for v in value if isinstance(v, str | int | float) and not isinstance(v, bool)]
    cleaned = [_clean_text(str(v)).strip("#").strip() for v in items]
    return ", ".join(t for t in cleaned if t)


def _normalise(obj: dict[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in obj.items():
        g = _granularity(key)
        if g is None or g in out:
            continue
        if g == "tag" and isinstance(value, str | list | tuple):
            text = _clean_tags(value)
        elif isinstance(value, str):
            text = _clean_text(value)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            text = " ".join(_clean_text(v) for v in value if v.strip())
        else:
            continue  # numbers, nested objects, null: nothing we can honestly call a caption
        if text:
            out[g] = text
    return out


def _json_objects(text: str) -> list[dict]:
    """Every top-level ``{...}`` span of ``text`` that parses as a JSON object, in order."""
    decoder = json.JSONDecoder()
    found: list[dict] = []
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def _lenient_pairs(text: str) -> dict[str, str]:
    """Complete ``"key": "value"`` / ``"key": [...]`` pairs of a truncated or malformed JSON object."""
    out: dict[str, str] = {}
    matches = [*_PAIR_LIST.finditer(text), *_PAIR_STRING.finditer(text)]
    for m in sorted(matches, key=lambda m: m.start()):
        try:
            key, value = json.loads(m.group(1)), json.loads(m.group(2))
        except json.JSONDecodeError:
            continue
        for g, v in _normalise({key: value}).items():
            out.setdefault(g, v)
    return out


def _labelled_lines(text: str) -> dict[str, str]:
    """``Detailed: ...`` / ``**Short:** ...`` / ``- Tags: a, b`` lines.

    A value is the rest of its label line; only a label with nothing after the colon takes the
    following lines, up to a blank line (so trailing chatter is not glued onto the last caption).
    """
    fields: dict[str, list[str]] = {}
    current: str | None = None  # the label whose value continues on the next lines
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            g = _granularity(m["label"])
            current = None
            if g is not None and g not in fields:  # keep the first occurrence
                fields[g] = [m["rest"].strip()]
                current = g if not fields[g][0] else None
        elif current is not None:
            if not line.strip() or line.strip().startswith("```"):
                current = None if any(fields[current]) or line.strip() else current
            else:
                fields[current].append(line.strip())
    return _normalise({g: " ".join(p for p in parts if p) for g, parts in fields.items()})


def parse_captions(text: str | None) -> dict[str, str]:
    """Read the granularity captions out of one model output.

    Tried in order: a JSON object (inside a fenced block or anywhere in the text, chatter around it is
    ignored), the complete ``"key": value`` pairs of a truncated/malformed object, then labelled lines
    (``Detailed: ...``, ``Tag: a, b``). Keys are matched case-insensitively (``tags`` and
    ``*_caption`` are accepted); only :data:`GRANULARITIES` are returned, values are stripped, empty
    ones dropped, tags joined with ``", "``.
    """
    if not text or not text.strip():
        return {}
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        for obj in _json_objects(candidate):
            parsed = _normalise(obj)
            if parsed:
                return parsed
    if "{" in text or '":' in text:
        parsed = _lenient_pairs(text)
        if parsed:
            return parsed
    return _labelled_lines(text)


def _missing_message(captions: dict[str, dict[str, str]], languages: Sequence[str]) -> str | None:
    problems = []
    for lang in languages:
        got = captions.get(lang, {})
        if not got:
            problems.append(f"{lang}: no caption could be parsed from the model output")
        elif missing := [g for g in GRANULARITIES if g not in got]:
            problems.append(f"{lang}: missing {', '.join(missing)}")
    return "; ".join(problems) or None


# ----------------------------------------------------------------------------------------------
# The captioner


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextmanager
def _quiet_transformers() -> Iterator[None]:
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
            with _quiet_transformers():
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
                error=_missing_message(captions, self.languages),
                raw_by_language=dict(by_lang),
            )
        return [r for r in results if r is not None]

    def __repr__(self) -> str:
        return (
            f"VlmCaptioner(model_id={self.model_id!r}, prompt_version={PROMPT_VERSION!r}, "
            f"languages={self.languages}, batch_size={self.batch_size}, max_pixels={self.max_pixels})"
        )


# ----------------------------------------------------------------------------------------------
# A tiny random Qwen2-VL, built offline


@dataclass(frozen=True)
class TinyQwen2VLSpec:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_depth: int
    vision_dim: int
    vision_heads: int
    vocab_size: int = 1024
    max_pixels: int = 16 * PATCH_FACTOR * PATCH_FACTOR  # the saved processor's default

    @property
    def mrope_section(self) -> list[int]:
        half = self.text_hidden // self.text_heads // 2  # rotary frequencies per head
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


TINY_QWEN2VL_SPECS = {
    "tiny": TinyQwen2VLSpec(64, 2, 4, 2, 128, vision_depth=2, vision_dim=32, vision_heads=2),
    "small": TinyQwen2VLSpec(256, 4, 8, 2, 768, vision_depth=4, vision_dim=128, vision_heads=4),
}


def _tokenizer_corpus() -> list[str]:
    lines = list(PROMPTS.values())
    try:
        from model.text import tokenizer_corpus

        lines += tokenizer_corpus(n_sentences=1500)
    except ImportError:  # pragma: no cover - the package is always installed with model/
        pass
    lines += ['{"detailed": "", "medium": "", "short": "", "tag": ["", ""]}', "```json\n{}\n```"]
    return lines


def build_qwen2_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE trained offline on a small bilingual corpus, as a ``Qwen2Tokenizer`` with the
    Qwen2-VL special tokens and chat template (``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN2_VL_SPECIAL_TOKENS]}
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.model_max_length = 32768
    return tok


def build_tiny_qwen2vl(path: str | Path, seed: int = 0, *, size: str = "tiny") -> Path:
    """Save a random-weight Qwen2-VL (``size`` in :data:`TINY_QWEN2VL_SPECS`) with its processor in
    ``path``, loadable like a real checkpoint (``VlmCaptioner(path)``). Deterministic for a seed."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if size not in TINY_QWEN2VL_SPECS:
        choices = ", ".join(TINY_QWEN2VL_SPECS)
        raise CaptionerError(f"unknown tiny Qwen2-VL size {size!r} (choose from {choices})")
    spec = TINY_QWEN2VL_SPECS[size]
    path = Path(path)
    tokenizer = build_qwen2_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=spec.max_pixels)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": spec.mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_dim,
            "hidden_size": spec.text_hidden,
            "num_heads": spec.vision_heads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(path)
        # The layout of a hub checkpoint: tokenizer files (with the chat template) + preprocessor_config.json.
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)
    return path
