"""The captions table: one row per (image, granularity, language), and the training-caption view."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pandas as pd

GRANULARITIES = ("detailed", "medium", "short", "tag")
LANGUAGES = ("en", "zh")
CAPTION_COLUMNS = ("image_id", "granularity", "language", "text", "backend")


def caption_rows(image_id: str, captions: dict[str, dict[str, str]], backend: str) -> list[dict[str, str]]:
    """Rows for one image from ``{language: {granularity: text}}``; empty texts are dropped."""
    return [
        {"image_id": image_id, "granularity": g, "language": lang, "text": text.strip(), "backend": backend}
        for lang in LANGUAGES
        for g in GRANULARITIES
        if (text := captions.get(lang, {}).get(g, "")) and text.strip()
    ]


def training_captions(rows: Iterable[dict[str, str]]) -> str:
    """The ``captions`` JSON column of a training manifest."""
    return json.dumps(
        [{"granularity": r["granularity"], "language": r["language"], "text": r["text"]} for r in rows],
        ensure_ascii=False,
    )


def captions_frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(CAPTION_COLUMNS))
