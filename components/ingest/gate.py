"""great_expectations gate on the ingest manifest: failure stops the pipeline, result is saved."""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common.errors import LuminaError

ALLOWED_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]


@dataclass
class GateResult:
    success: bool
    failed: list[str]
    result_path: Path  # the great_expectations results as JSON; an HTML page beside it


class GateFailed(LuminaError):
    """The data did not meet its expectations (details in the saved result)."""

    def __init__(self, message: str, result: GateResult | None = None) -> None:
        super().__init__(message)
        self.result = result


DATA_EXPERIMENT = "lumina-data"


def log_gate(result: GateResult, step: str, tags: dict[str, str], tracking_uri: str) -> str:
    """Record a gate's outcome as an MLflow run (experiment ``lumina-data``): tags, the failed
    expectations, and the JSON + HTML results as artifacts. Returns the run id. On a cluster this is
    what keeps a failed gate's evidence: Kubeflow does not upload the outputs of a failed task.
    No process-wide MLflow state is changed (:mod:`components.tracking`)."""
    from components.tracking import client_run

    run_tags = {**tags, "step": step, "gate": "passed" if result.success else "failed"}
    with client_run(tracking_uri, DATA_EXPERIMENT, f"{step}-gate", run_tags) as run:
        run.client.log_metric(run.run_id, "gate_passed", float(result.success))
        run.client.log_metric(run.run_id, "failed_expectations", len(result.failed))
        if result.failed:
            run.client.log_text(run.run_id, "\n".join(result.failed) + "\n", "failed_expectations.txt")
        for path in (result.result_path, result.result_path.with_suffix(".html")):
            if path.is_file():
                run.client.log_artifact(run.run_id, str(path))
        run.status = "FINISHED" if result.success else "FAILED"
    return run.run_id


def tracked_gate(gate: Callable[[], GateResult], step: str, tags: dict[str, str],
                 tracking_uri: str | None = None) -> GateResult:  # fmt: skip
    """Run ``gate`` and, when a tracking URI is given (default ``MLFLOW_TRACKING_URI``), log its
    outcome to MLflow whether it passes or fails; a failure is raised after it is logged."""
    uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    try:
        result = gate()
    except GateFailed as exc:
        if uri and exc.result is not None:
            log_gate(exc.result, step, tags, uri)
        raise
    if uri:
        log_gate(result, step, tags, uri)
    return result


def describe_expectation(config: Any) -> str:
    """``type(column)`` of an expectation, as failures are named in errors and reports."""
    column = config.kwargs.get("column") or config.kwargs.get("column_A") or ""
    return f"{config.type}({column})"


def _observed(result: dict[str, Any]) -> str:
    """What a great_expectations result saw, in a few words."""
    if "observed_value" in result:
        return f"observed {result['observed_value']}"
    if "unexpected_count" in result:
        text = f"{result['unexpected_count']} of {result.get('element_count', '?')} unexpected"
        sample = result.get("partial_unexpected_list") or []
        return text + (f", e.g. {', '.join(map(str, sample[:5]))}" if sample else "")
    return ""


def save_validation(results: Sequence[Any], json_path: Path, title: str) -> Path:
    """Save great_expectations validation results as JSON at ``json_path`` and as a readable HTML
    page beside it (``.html``): one row per expectation, failures first. Returns the JSON path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    dicts = [r.to_json_dict() for r in results]
    json_path.write_text(json.dumps(dicts[0] if len(dicts) == 1 else dicts, indent=2, default=str))
    rows = [
        (bool(r.success), suite.suite_name or "",
         describe_expectation(r.expectation_config), _observed(r.result or {}))
        for suite in results for r in suite.results
    ]  # fmt: skip
    rows.sort(key=lambda row: row[0])
    status = "passed" if all(ok for ok, *_ in rows) else "FAILED"
    body = "".join(
        f"<tr class={'ok' if ok else 'bad'}><td>{'pass' if ok else 'FAIL'}</td><td>{html.escape(suite)}</td>"
        f"<td><code>{html.escape(name)}</code></td><td>{html.escape(observed)}</td></tr>\n"
        for ok, suite, name, observed in rows
    )
    page = (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}td{padding:2px 8px}"
        ".bad{background:#fdd}.ok{background:#efe}</style>"
        f"<h1>{html.escape(title)}: {status}</h1>"
        f"<p>{sum(not ok for ok, *_ in rows)} of {len(rows)} expectations failed.</p>"
        f"<table><tr><th>result</th><th>suite</th><th>expectation</th><th>observed</th></tr>\n{body}</table>\n"
    )
    json_path.with_suffix(".html").write_text(page, encoding="utf-8")
    return json_path


def ephemeral_context():
    """A great_expectations ephemeral context, its chatty INFO logging turned down and its
    progress bars off (a validation takes a fraction of a second; the bars only clutter logs)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def validate_frames(
    context: Any, checks: Sequence[tuple[str, pd.DataFrame, Any]], json_path: Path, title: str
) -> GateResult:
    """Validate each ``(name, frame, suite)`` in ``context`` (:func:`ephemeral_context`, made before
    the suites: great_expectations needs an active context to build them), save the results
    (:func:`save_validation`) and raise :class:`GateFailed` naming every failed expectation."""
    source = context.data_sources.add_pandas(title.replace(" ", "_"))
    results = [
        source.add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
        .validate(suite)
        for name, frame, suite in checks
    ]
    path = save_validation(results, json_path, title)
    failed = [
        describe_expectation(r.expectation_config) for res in results for r in res.results if not r.success
    ]
    gate = GateResult(not failed, failed, path)
    if failed:
        raise GateFailed(
            f"{title} failed {len(failed)} expectation(s): {', '.join(failed)} (see {path})", gate
        )
    return gate


def run_gate(manifest: pd.DataFrame, out_dir: Path, *, max_side: int = 100_000) -> GateResult:
    """Validate the manifest with a great_expectations suite; write ``ge_result.json`` / ``.html``; raise
    :class:`GateFailed` naming the failed expectations when it does not pass."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = ephemeral_context()
    suite = gx.ExpectationSuite(name="ingest_manifest")
    for column in ("id", "shard", "member", "sha256", "width", "height", "format"):
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="id"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="sha256"))
    for column in ("width", "height"):
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeBetween(column=column, min_value=1, max_value=max_side)
        )
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="format", value_set=ALLOWED_FORMATS))
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    checks = [("manifest", manifest, suite)]
    return validate_frames(context, checks, out_dir / "ge_result.json", "ingest manifest")
