"""The captions table: one row per (image, caption kind, language), and the training-caption view.

A caption *kind* is stored in the ``granularity`` column (so the training manifest's ``captions`` JSON
keeps its ``{granularity, language, text}`` entries): one of the four UniCap lengths
(:data:`GRANULARITIES`) or one of the UniCap perspectives (:data:`PERSPECTIVES`: style, main object,
all objects, attributes, spatial relations, visible text). An ``ocr`` caption of :data:`NO_TEXT` says
the captioner saw no text in the image; it is kept in the table (an answer, not a gap) but is never a
training caption (:func:`is_training_caption`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pandas as pd

GRANULARITIES = ("detailed", "medium", "short", "tag")
PERSPECTIVES = ("style", "main_object", "objects", "attributes", "spatial", "ocr")
CAPTION_KINDS = GRANULARITIES + PERSPECTIVES
LANGUAGES = ("en", "zh")
CAPTION_COLUMNS = ("image_id", "granularity", "language", "text", "backend")
NO_TEXT = "none"  # the ``ocr`` caption of an image without visible text


def is_training_caption(granularity: str, text: str) -> bool:
    """Whether a caption can condition the generator: not empty, and not the "no visible text"
    answer of the ``ocr`` perspective."""
    text = text.strip()
    return bool(text) and not (granularity == "ocr" and text.lower() == NO_TEXT)


def caption_rows(image_id: str, captions: dict[str, dict[str, str]], backend: str) -> list[dict[str, str]]:
    """Rows for one image from ``{language: {kind: text}}`` (lengths, then perspectives); empty texts
    are dropped."""
    return [
        {"image_id": image_id, "granularity": g, "language": lang, "text": text.strip(), "backend": backend}
        for lang in LANGUAGES
        for g in CAPTION_KINDS
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
