"""Deterministic caption backends: ``metadata`` (ground truth of the synthetic set) and
``alt-text`` (existing human captions, e.g. the Tux Paint stamps' lines). Neither invents text:
a caption kind or language it cannot honestly produce is left missing.

The ``metadata`` backend gives the four lengths recorded with each scene and derives the UniCap
perspectives from the scene's objects (:func:`scene_perspectives`): style (the generator's flat
rendering), main object, all objects, attributes (colors, counts, sizes), spatial relations (regions,
stacking, left/right of each other) and ocr (``none``: the renderer draws no text), in English and
Chinese, so the default pipeline exercises them end to end."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from components.recaption.schema import CAPTION_KINDS, LANGUAGES, NO_TEXT, PERSPECTIVES
from data_tools.synthetic import COLORS_ZH, NUMBERS, NUMBERS_ZH, REGIONS_ZH, SHAPES_ZH

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
    """All captions recorded in the ground truth, by language and caption kind, plus the perspectives
    derived from the scene's objects (a recorded caption wins over a derived one)."""
    out: dict[str, dict[str, str]] = {}
    for cap in entry.get("captions", []):
        if cap["language"] in LANGUAGES and cap["granularity"] in CAPTION_KINDS:
            out.setdefault(cap["language"], {})[cap["granularity"]] = cap["text"]
    for lang, views in scene_perspectives(entry).items():
        for kind, text in views.items():
            out.setdefault(lang, {}).setdefault(kind, text)
    return out


def _scene_groups(objects: list[dict]) -> list[tuple[str, str, str, list[tuple[int, ...]]]] | None:
    """``(shape, color, region, boxes)`` per group of like objects in a region, in scene order; ``None``
    when an object is outside the generator's vocabulary (then nothing is derived)."""
    groups: dict[tuple[str, str, str], list[tuple[int, ...]]] = {}
    for obj in objects:
        try:
            shape, color, region, box = obj["shape"], obj["color"], obj["region"], tuple(obj["bbox"])
        except (KeyError, TypeError):
            return None
        if shape not in SHAPES_ZH or color not in COLORS_ZH or region not in REGIONS_ZH or len(box) != 4:
            return None
        groups.setdefault((shape, color, region), []).append(box)
    return [(s, c, r, boxes) for (s, c, r), boxes in groups.items()] or None


def _en(shape: str, color: str, n: int, article: str = "") -> str:
    noun = shape if n == 1 else f"{shape}s"
    return f"the {color} {noun}" if article == "the" else f"{NUMBERS.get(n, str(n))} {color} {noun}"


def _zh(shape: str, color: str, n: int | None = None) -> str:
    count = "" if n is None else NUMBERS_ZH.get(n, f"{n}个")
    return f"{count}{COLORS_ZH[color]}的{SHAPES_ZH[shape]}"


def _stacked(boxes: list[tuple[int, ...]]) -> bool:
    return len(boxes) > 1 and len({b[0] for b in boxes}) == 1 and len({b[1] for b in boxes}) == len(boxes)


def scene_perspectives(entry: dict) -> dict[str, dict[str, str]]:
    """The UniCap perspectives of a synthetic scene (``metadata.jsonl`` entry with ``objects``), by
    language; empty for anything not made by :mod:`data_tools.synthetic` (nothing is guessed)."""
    if entry.get("source") != "synthetic":
        return {}
    groups = _scene_groups(entry.get("objects") or [])
    if groups is None:
        return {}
    counts = [len(boxes) for *_, boxes in groups]
    be = ["is" if n == 1 else "are" for n in counts]
    main = [g for g, n in zip(groups, counts, strict=True) if n == max(counts)]
    sizes = {(b[2] - b[0], b[3] - b[1]) for *_, boxes in groups for b in boxes}
    same_size = len(sizes) == 1 and sum(counts) > 1

    en_spatial, zh_spatial = [], []
    for (shape, color, region, boxes), n, verb in zip(groups, counts, be, strict=True):
        stacked = _stacked(boxes)
        en_spatial.append(
            f"{_en(shape, color, n, 'the')} {verb} on the {region} side of the image"
            + (", stacked in a vertical column" if stacked else "")
        )
        zh_spatial.append(
            f"{_zh(shape, color)}在画面{REGIONS_ZH[region]}" + ("，上下排成一列" if stacked else "")
        )
    sides = {region: (shape, color, len(boxes)) for shape, color, region, boxes in groups}
    if len(groups) == 2 and set(sides) == {"left", "right"}:
        (ls, lc, ln), (rs, rc, rn) = sides["left"], sides["right"]
        en_spatial.append(
            f"{_en(ls, lc, ln, 'the')} {'is' if ln == 1 else 'are'} to the left of {_en(rs, rc, rn, 'the')}"
        )
        zh_spatial.append(f"{_zh(ls, lc)}在{_zh(rs, rc)}的左边")

    en = {
        "style": "A flat synthetic rendering: solid-colored geometric shapes without outlines on a plain "
        "light background.",
        "main_object": " and ".join(_en(s, c, len(b)) for s, c, _, b in main),
        "objects": ", ".join(_en(s, c, len(b)) for s, c, _, b in groups),
        "attributes": "; ".join(
            f"the {s if n == 1 else s + 's'} on the {r} {verb} {c}, solid-filled"
            for (s, c, r, _), n, verb in zip(groups, counts, be, strict=True)
        )
        + ("; all shapes are the same size" if same_size else "")
        + ".",
        "spatial": "; ".join(en_spatial) + ".",
        "ocr": NO_TEXT,
    }
    zh = {
        "style": "扁平的合成渲染图：浅色纯背景上没有轮廓线的纯色几何图形。",
        "main_object": "和".join(_zh(s, c, len(b)) for s, c, _, b in main),
        "objects": "、".join(_zh(s, c, len(b)) for s, c, _, b in groups),
        "attributes": "；".join(
            f"{REGIONS_ZH[r]}的{SHAPES_ZH[s]}是{COLORS_ZH[c]}的，纯色填充" for s, c, r, _ in groups
        )
        + ("；所有图形大小相同" if same_size else "")
        + "。",
        "spatial": "；".join(zh_spatial) + "。",
        "ocr": NO_TEXT,
    }
    assert set(en) == set(zh) == set(PERSPECTIVES)
    return {"en": en, "zh": zh}


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
