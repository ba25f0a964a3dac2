"""great_expectations gate on the ingest manifest: failure stops the pipeline, result is saved."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model.errors import LuminaError

ALLOWED_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]


class GateFailed(LuminaError):
    """The manifest did not meet its expectations (details in the saved result)."""


@dataclass
class GateResult:
    success: bool
    failed: list[str]
    result_path: Path


def ephemeral_context():
    """A great_expectations ephemeral context, its chatty INFO logging turned down."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx.get_context(mode="ephemeral")


def run_gate(manifest: pd.DataFrame, out_dir: Path, *, max_side: int = 100_000) -> GateResult:
    """Validate the manifest with a great_expectations suite; write ``ge_result.json``; raise
    :class:`GateFailed` naming the failed expectations when it does not pass."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = ephemeral_context()
    batch = (
        context.data_sources.add_pandas("ingest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": manifest})
    )
    suite = gx.ExpectationSuite(name="ingest_manifest")
    for column in ("id", "path", "sha256", "width", "height", "format"):
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="id"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="sha256"))
    for column in ("width", "height"):
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeBetween(column=column, min_value=1, max_value=max_side)
        )
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="format", value_set=ALLOWED_FORMATS))
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    result = batch.validate(suite)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "ge_result.json"
    path.write_text(json.dumps(result.to_json_dict(), indent=2, default=str))
    failed = [
        f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column', '')})"
        for r in result.results
        if not r.success
    ]
    gate = GateResult(bool(result.success), failed, path)
    if not gate.success:
        raise GateFailed(
            f"ingest manifest failed {len(failed)} expectation(s): {', '.join(failed)} (see {path})"
        )
    return gate
