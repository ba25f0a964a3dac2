"""great_expectations gate on the captions: required granularities present, lengths ordered
detailed > medium > short, text in the labelled language (not checked for tags and the ``ocr``
perspective, which is the visible text verbatim or ``none``), known caption kinds only, no empty
strings. The UniCap perspectives are optional (a captioner may be configured without them)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.ingest.gate import GateResult, ephemeral_context, validate_frames
from components.recaption.backends import guess_language
from components.recaption.schema import CAPTION_KINDS, GRANULARITIES, LANGUAGES

_ANY_LANGUAGE = ("tag", "ocr")  # kinds whose text need not be in the labelled language

# What each backend must deliver per image (language, granularity); alt text promises one line.
REQUIRED: dict[str, set[tuple[str, str]]] = {
    "metadata": {(lang, g) for lang in LANGUAGES for g in GRANULARITIES},
    "vlm": {(lang, g) for lang in LANGUAGES for g in GRANULARITIES},
    "alt-text": set(),
}


def per_image_checks(captions: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, language): missing required captions and caption lengths."""
    rows = []
    for (image_id, lang), group in captions.groupby(["image_id", "language"]):
        backend = group["backend"].iloc[0]
        have = set(group["granularity"])
        required = {g for rl, g in REQUIRED.get(backend, set()) if rl == lang}
        lengths = dict(zip(group["granularity"], group["text"].str.len(), strict=True))
        rows.append(
            {
                "image_id": image_id,
                "language": lang,
                "backend": backend,
                "missing_required": len(required - have),
                **{f"len_{g}": lengths.get(g) for g in ("detailed", "medium", "short")},
            }
        )
    return pd.DataFrame(rows)


def run_caption_gate(captions: pd.DataFrame, out_dir: Path) -> GateResult:
    """Validate the captions table; write ``caption_ge_result.json`` / ``.html``; raise
    :class:`GateFailed` naming the failed expectations."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    table = captions.copy()
    table["detected_language"] = [guess_language(t) for t in table["text"]]
    table["language_matches"] = table["detected_language"].eq(table["language"]) | table["granularity"].isin(
        _ANY_LANGUAGE
    )
    checks = per_image_checks(captions)
    context = ephemeral_context()
    text_suite = gx.ExpectationSuite(name="caption_texts")
    for column in ("image_id", "granularity", "language", "text", "backend"):
        text_suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    text_suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1))
    text_suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="granularity", value_set=CAPTION_KINDS))
    text_suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="language", value_set=LANGUAGES))
    text_suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="language_matches", value_set=[True]))
    text_suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))

    image_suite = gx.ExpectationSuite(name="caption_images")
    image_suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(column="missing_required", min_value=0, max_value=0)
    )
    for longer, shorter in (("len_detailed", "len_medium"), ("len_medium", "len_short")):
        image_suite.add_expectation(
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=longer, column_B=shorter, or_equal=False, ignore_row_if="either_value_is_missing"
            )
        )
    suites = [("texts", table, text_suite), ("images", checks, image_suite)]
    return validate_frames(context, suites, out_dir / "caption_ge_result.json", "captions")
