"""Deterministic caption backends: ``metadata`` (ground truth of the synthetic set) and
``alt-text`` (existing human captions, e.g. the Tux Paint stamps' lines). Neither invents text:
a granularity or language it cannot honestly produce is left missing."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from components.recaption.schema import GRANULARITIES, LANGUAGES

METADATA_FILE = "metadata.jsonl"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# Tux Paint stamp descriptions: first line English, then ``locale.utf8=translation`` lines.
_LOCALE_LINE = re.compile(r"^(?P<locale>[A-Za-z]{2,3}(?:_[A-Za-z]{2,4})?)(?:\.[\w-]+)?=(?P<text>.+)$")


def guess_language(text: str) -> str:
    """``zh`` when most letters are CJK ideographs, else ``en`` (the only two we caption in)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "unknown"
    return "zh" if sum(bool(_CJK.match(c)) for c in letters) / len(letters) > 0.3 else "en"


@lru_cache(maxsize=64)
def _metadata_index(folder: str) -> dict[str, dict]:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    index = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            index[entry["file"]] = entry
    return index


def metadata_entry(source_path: str) -> dict | None:
    """The ground-truth metadata of an ingested file, if its source folder has ``metadata.jsonl``."""
    if "::" in source_path or source_path.startswith("s3://"):
        return None
    path = Path(source_path)
    return _metadata_index(str(path.parent.resolve())).get(path.name)


def metadata_captions(entry: dict) -> dict[str, dict[str, str]]:
    """All captions recorded in the ground truth, by language and granularity."""
    out: dict[str, dict[str, str]] = {}
    for cap in entry.get("captions", []):
        if cap["language"] in LANGUAGES and cap["granularity"] in GRANULARITIES:
            out.setdefault(cap["language"], {})[cap["granularity"]] = cap["text"]
    return out


def alt_text_captions(alt_text: str | float | None) -> dict[str, dict[str, str]]:
    """Human alt text as the ``short`` caption per language; nothing else is claimed."""
    if not isinstance(alt_text, str) or not alt_text.strip():  # None / NaN from Parquet / blank
        return {}
    out: dict[str, dict[str, str]] = {}
    for line in (ln.strip() for ln in alt_text.splitlines()):
        if not line:
            continue
        match = _LOCALE_LINE.match(line)
        if match:
            locale = match["locale"].lower()
            lang = "zh" if locale.startswith("zh") else "en" if locale.startswith("en") else None
            text = match["text"].strip()
        else:
            lang, text = guess_language(line), line
        if lang in LANGUAGES and text and "short" not in out.get(lang, {}):
            out.setdefault(lang, {})["short"] = text
    return out
