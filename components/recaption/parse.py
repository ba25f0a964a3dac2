"""Reading captions out of a captioning model's text output (the ``vlm`` backend of UniCap).

The model is asked for one JSON object per image and language (:mod:`components.recaption.vlm`), but
real models wrap it in fences or chatter, truncate it, or answer with labelled lines instead; the
parser accepts all of these.

Honesty: the parser only returns what it can read from the model output. A granularity that cannot be
parsed is absent (never invented), and :func:`missing_message` says what is missing. A random-weight
model (:mod:`components.recaption.tiny_vlm`) produces gibberish, so it normally yields empty captions
and an error message; that is expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from components.recaption.schema import GRANULARITIES

__all__ = ["missing_message", "parse_captions"]

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


def missing_message(captions: dict[str, dict[str, str]], languages: Sequence[str]) -> str | None:
    """What is missing from ``captions`` for the requested ``languages`` (``None``: nothing)."""
    problems = []
    for lang in languages:
        got = captions.get(lang, {})
        if not got:
            problems.append(f"{lang}: no caption could be parsed from the model output")
        elif missing := [g for g in GRANULARITIES if g not in got]:
            problems.append(f"{lang}: missing {', '.join(missing)}")
    return "; ".join(problems) or None
