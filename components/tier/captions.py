"""Caption helpers the caption scorer and the tiering share (no plugin is imported through
here): a caption's length in words with CJK counted by characters, the captions of a manifest row,
and the languages an image is captioned in."""

from __future__ import annotations

import json
import re

_CJK_CHAR = re.compile(
    r"[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
    r"\U00020000-\U0002fa1f]"
)
"""Han, kana and hangul syllables: scripts written without spaces between words."""


def caption_units(text: str) -> int:
    """Length of a caption in words, where every CJK character (Han, kana, hangul) counts as one
    and the rest is split on whitespace: ``"一只猫坐在窗台上"`` is 8, ``"a cat on a sill"`` is 5.
    (Splitting Chinese on whitespace would count a whole sentence as one word.)"""
    cjk = len(_CJK_CHAR.findall(text))
    return cjk + len(_CJK_CHAR.sub(" ", text).split())


def caption_list(value: object) -> list[dict]:
    """The manifest's ``captions`` JSON (a list of ``{granularity, language, text}``), [] if none."""
    if not value or not isinstance(value, str):
        return []
    return [c for c in json.loads(value) if isinstance(c, dict) and str(c.get("text") or "").strip()]


def caption_languages(value: object) -> str:
    """The sorted languages an image is captioned in, joined by ``+`` (``"en+zh"``; ``""`` if none)."""
    return "+".join(sorted({str(c.get("language") or "") for c in caption_list(value)}))
