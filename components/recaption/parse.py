"""Reading captions out of a captioning model's text output (the ``vlm`` backend of UniCap).

The model is asked for one JSON object per image, language and prompt (:mod:`components.recaption.vlm`:
one with the four lengths, one with the perspectives), but real models wrap it in fences or chatter,
truncate it, or answer with labelled lines instead; the parser accepts all of these. Which caption
kinds an answer is read for is the ``kinds`` argument (default: the four lengths); keys are matched
case-insensitively with common aliases (``tags``, ``*_caption``, ``main subject``, ``all objects``,
``spatial relations``, ``visible text``, ...).

Values: ``tag`` and ``objects`` may be lists (joined with ``", "``); ``ocr`` is the visible text
verbatim, and an explicit "no text" answer (``"none"``, ``""``, ``null``, ``[]``, ``"无"``, ...) becomes
:data:`components.recaption.schema.NO_TEXT`.

Honesty: the parser only returns what it can read from the model output. A caption kind that cannot
be parsed is absent (never invented), and :func:`missing_message` says what is missing. A random-weight
model (:mod:`components.recaption.tiny_vlm`) produces gibberish, so it normally yields empty captions
and an error message; that is expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from components.recaption.schema import CAPTION_KINDS, GRANULARITIES, NO_TEXT

__all__ = ["missing_message", "parse_captions"]

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
# A complete JSON string: "..." with escapes.
_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_PAIR_STRING = re.compile(rf"({_JSON_STRING})\s*:\s*({_JSON_STRING})", re.DOTALL)
_PAIR_LIST = re.compile(
    rf"({_JSON_STRING})\s*:\s*(\[\s*(?:{_JSON_STRING}(?:\s*,\s*{_JSON_STRING})*\s*)?\])", re.DOTALL
)
# The label words of labelled-line answers, per caption kind (regex alternatives).
_LABEL_WORDS = {
    "detailed": r"detailed|detail",
    "medium": r"medium",
    "short": r"short",
    "tag": r"tags?",
    "style": r"(?:art|visual|image)?[ _-]?style",
    "main_object": r"main[ _-]?(?:object|subject)",
    "objects": r"(?:all[ _-]?)?objects?(?:[ _-]?list)?",
    "attributes": r"(?:object[ _-]?)?attributes?",
    "spatial": r"spatial(?:[ _-]?relation(?:ship)?s?)?|relations?|relationships?",
    "ocr": r"ocr(?:[ _-]?text)?|visible[ _-]?text|text",
}
_TAG_SPLIT = re.compile(r"\s*[,，、;；\n]\s*")
_KEY_ALIASES = {
    "detail": "detailed",
    "tags": "tag",
    "art style": "style",
    "visual style": "style",
    "image style": "style",
    "main object": "main_object",
    "mainobject": "main_object",
    "main subject": "main_object",
    "mainsubject": "main_object",
    "object": "objects",
    "all objects": "objects",
    "allobjects": "objects",
    "object list": "objects",
    "objects list": "objects",
    "attribute": "attributes",
    "object attributes": "attributes",
    "object attribute": "attributes",
    "spatial relation": "spatial",
    "spatial relations": "spatial",
    "spatial relationship": "spatial",
    "spatial relationships": "spatial",
    "relation": "spatial",
    "relations": "spatial",
    "relationship": "spatial",
    "relationships": "spatial",
    "ocr text": "ocr",
    "visible text": "ocr",
    "text": "ocr",
}
_LIST_KINDS = ("tag", "objects")  # values that are keyword lists
# Answers meaning "there is no visible text" (lowercased, without surrounding punctuation).
_NO_TEXT_ANSWERS = {
    "", "none", "no", "no text", "no visible text", "none visible", "no text visible", "there is no text",
    "there is no visible text", "n/a", "na", "null", "nil", "nothing", "无", "没有", "无文字", "无文本",
    "没有文字", "没有文本", "无可见文字", "没有可见文字", "图中没有文字", "图片中没有文字",
}  # fmt: skip
_EDGE_PUNCTUATION = " \t\n.。!！,，;；:：-—'\"“”「」()（）[]"


@lru_cache(maxsize=16)
def _label_pattern(kinds: tuple[str, ...]) -> re.Pattern[str]:
    """``Label: value`` lines for the labels of ``kinds`` only."""
    words = "|".join(_LABEL_WORDS[k] for k in kinds)
    return re.compile(
        r"^\s*(?:[-*•>#]+\s*|\d+[.)]\s*)?(?:\*\*|__)?\s*"
        rf"(?P<label>{words})(?:[ _-]*(?:caption|description))?"
        r"\s*(?:\*\*|__)?\s*[:：]\s*(?:\*\*|__)?\s*(?P<rest>.*)$",
        re.IGNORECASE,
    )


def _kind(key: Any, kinds: Sequence[str] = GRANULARITIES) -> str | None:
    """Map a key like ``"Detailed"``, ``"short_caption"``, ``"tags"`` or ``"Main subject"`` to one of
    ``kinds``."""
    if not isinstance(key, str):
        return None
    k = re.sub(r"[\s_-]+", " ", key.strip().lower())
    k = re.sub(r" (caption|description)$", "", k)
    k = _KEY_ALIASES.get(k, k)
    return k if k in kinds else None


def _granularity(key: Any) -> str | None:
    """Map a key to one of the four lengths (:data:`GRANULARITIES`)."""
    return _kind(key, GRANULARITIES)


def _no_text(value: str) -> bool:
    return value.strip(_EDGE_PUNCTUATION).lower() in _NO_TEXT_ANSWERS


def _clean_ocr(value: Any) -> str | None:
    """The visible text verbatim, :data:`NO_TEXT` for an explicit "no text" answer, ``None`` for a
    value that is not an answer (a number, a nested object)."""
    if value is None:
        return NO_TEXT
    if isinstance(value, str):
        return NO_TEXT if _no_text(value) else _clean_text(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        texts = [_clean_text(v) for v in value if not _no_text(v)]
        return "; ".join(texts) if texts else NO_TEXT
    return None


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


def _normalise(obj: dict[Any, Any], kinds: Sequence[str] = GRANULARITIES) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in obj.items():
        g = _kind(key, kinds)
        if g is None or g in out:
            continue
        if g == "ocr":
            text = _clean_ocr(value)
            if text is None:
                continue
        elif g in _LIST_KINDS and isinstance(value, str | list | tuple):
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


def _lenient_pairs(text: str, kinds: Sequence[str] = GRANULARITIES) -> dict[str, str]:
    """Complete ``"key": "value"`` / ``"key": [...]`` pairs of a truncated or malformed JSON object."""
    out: dict[str, str] = {}
    matches = [*_PAIR_LIST.finditer(text), *_PAIR_STRING.finditer(text)]
    for m in sorted(matches, key=lambda m: m.start()):
        try:
            key, value = json.loads(m.group(1)), json.loads(m.group(2))
        except json.JSONDecodeError:
            continue
        for g, v in _normalise({key: value}, kinds).items():
            out.setdefault(g, v)
    return out


def _labelled_lines(text: str, kinds: Sequence[str] = GRANULARITIES) -> dict[str, str]:
    """``Detailed: ...`` / ``**Short:** ...`` / ``- Tags: a, b`` lines.

    A value is the rest of its label line; only a label with nothing after the colon takes the
    following lines, up to a blank line (so trailing chatter is not glued onto the last caption).
    """
    label = _label_pattern(tuple(kinds))
    fields: dict[str, list[str]] = {}
    current: str | None = None  # the label whose value continues on the next lines
    for line in text.splitlines():
        m = label.match(line)
        if m:
            g = _kind(m["label"], kinds)
            current = None
            if g is not None and g not in fields:  # keep the first occurrence
                fields[g] = [m["rest"].strip()]
                current = g if not fields[g][0] else None
        elif current is not None:
            if not line.strip() or line.strip().startswith("```"):
                current = None if any(fields[current]) or line.strip() else current
            else:
                fields[current].append(line.strip())
    joined = {g: " ".join(p for p in parts if p) for g, parts in fields.items()}
    # a label with nothing after it (e.g. a truncated answer) is no answer, not an empty ``ocr``
    return _normalise({g: text for g, text in joined.items() if text.strip()}, kinds)


def parse_captions(text: str | None, kinds: Sequence[str] = GRANULARITIES) -> dict[str, str]:
    """Read the captions of ``kinds`` (default: the four lengths) out of one model output.

    Tried in order: a JSON object (inside a fenced block or anywhere in the text, chatter around it is
    ignored), the complete ``"key": value`` pairs of a truncated/malformed object, then labelled lines
    (``Detailed: ...``, ``Tag: a, b``, ``Main object: ...``). Keys are matched case-insensitively
    (``tags``, ``*_caption`` and the aliases above are accepted); only ``kinds`` are returned, values
    are stripped, empty ones dropped (except an empty ``ocr``: no text), tags and objects joined with
    ``", "``.
    """
    unknown = [k for k in kinds if k not in CAPTION_KINDS]
    if unknown:
        raise ValueError(f"unknown caption kinds {unknown}; known: {', '.join(CAPTION_KINDS)}")
    if not text or not text.strip():
        return {}
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        for obj in _json_objects(candidate):
            parsed = _normalise(obj, kinds)
            if parsed:
                return parsed
    if "{" in text or '":' in text:
        parsed = _lenient_pairs(text, kinds)
        if parsed:
            return parsed
    return _labelled_lines(text, kinds)


def missing_message(
    captions: dict[str, dict[str, str]], languages: Sequence[str], kinds: Sequence[str] = GRANULARITIES
) -> str | None:
    """What of ``kinds`` (default: the four lengths) is missing from ``captions`` for the requested
    ``languages`` (``None``: nothing)."""
    problems = []
    for lang in languages:
        got = {k for k in captions.get(lang, {}) if k in kinds}
        if not got:
            problems.append(f"{lang}: no caption could be parsed from the model output")
        elif missing := [g for g in kinds if g not in got]:
            problems.append(f"{lang}: missing {', '.join(missing)}")
    return "; ".join(problems) or None
