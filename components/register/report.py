"""The register step's evaluation report: one self-contained HTML file (every image embedded) with
the gate decision and its reasons, the challenger's metrics against the champion's, the
challenger's images per prompt beside the champion's, each training stage's loss curve and sample
grids, and the data lineage. Everything is fetched from MLflow: the evaluate runs' ``evaluation/``
artifacts (``run.evaluate`` tag of each version), the stage runs' ``loss`` history and sample-grid
artifacts (``run.<stage>`` tags). What cannot be found becomes a note in the report, never a failure.
The same file is logged to the registered version's run as ``report.html``."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from common.errors import error_summary
from components.evaluate.report import Decision, EvalImages, StageTrace, build_report, key_value_table, render
from components.register.register import Registration, tag_metrics

log = logging.getLogger(__name__)
STAGES = ("lowres", "highres", "hq", "unified")
OPTIONAL_STAGES = ("unified",)  # shown only when the run had them (the unified phase is optional)
EVAL_ARTIFACTS = "evaluation"  # where log_evaluation puts the evaluate step's out_dir
REPORT_ARTIFACT = "report.html"
STAGE_METRICS = ("loss", "val_loss", "val_colors", "val_presence", "val_counting", "val_position")
"""The last values shown beside each stage's curve (the val_ scores: held-out synthetic prompts at the
stage's ``val_resolution``, components.train.validation.stage_compositional)."""
MAX_GRIDS = 6  # intermediate (EMA) sample grids per stage, evenly spaced, besides the final one
LINEAGE = (
    ("profile", "model profile"),
    ("data_version", "DVC data version"),
    ("dataset_hash", "dataset hash (ingest)"),
    ("captions_hash", "captions hash"),
    ("tiers_hash", "tiers hash"),
    ("source_fingerprint", "source fingerprint"),
    ("git_sha", "code (git sha)"),
    ("run.lowres", "stage 1 MLflow run (low-res)"),
    ("run.highres", "stage 2 MLflow run (high-res)"),
    ("run.hq", "stage 3 MLflow run (HQ)"),
    ("run.unified", "unified phase MLflow run (Template C grids)"),
    ("run.evaluate", "evaluation MLflow run"),
    ("pipeline_run", "pipeline run"),
)


def _download(tracking_uri: str, run_id: str, artifact: str, dest: Path) -> Path:
    import mlflow.artifacts

    dest.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact, dst_path=str(dest), tracking_uri=tracking_uri
    )
    return Path(local)


def fetch_evaluation(
    tracking_uri: str, run_id: str, label: str, dest: Path, notes: list[str]
) -> tuple[EvalImages | None, dict[str, Any]]:
    """The evaluate run's images and its ``metrics.json`` payload (``{}`` when missing); what is
    missing is added to ``notes``."""
    if not run_id:
        notes.append(f"{label}: no evaluation run recorded (run.evaluate tag empty): no images")
        return None, {}
    try:
        root = _download(tracking_uri, run_id, EVAL_ARTIFACTS, dest)
    except Exception as exc:  # MlflowException, OSError: the run or its artifacts are gone
        notes.append(
            f"{label}: evaluation artifacts of run {run_id} not available ({error_summary(exc, 200)})"
        )
        return None, {}
    payload: dict[str, Any] = {}
    if (root / "metrics.json").is_file():
        payload = json.loads((root / "metrics.json").read_text())
    samples_file = root / "samples.json"
    if not samples_file.is_file():
        notes.append(f"{label}: run {run_id} has no {EVAL_ARTIFACTS}/samples.json: no images")
        return None, payload
    return EvalImages(label, json.loads(samples_file.read_text()), root), payload


def _spread(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced, the last one kept."""
    if len(items) <= n:
        return items
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def stage_trace(client, tracking_uri: str, stage: str, run_id: str, dest: Path) -> StageTrace:
    """A stage's loss history (the run's ``loss`` metric, else its ``losses.jsonl`` artifact) and
    its sample grids (``samples/samples-<step>.png`` during the stage, ``samples.png`` at its end)."""
    trace = StageTrace(stage, run_id)
    if not run_id:
        trace.notes.append(f"no MLflow run recorded for stage {stage} (run.{stage} tag empty)")
        return trace
    try:
        latest = client.get_run(run_id).data.metrics
        trace.metrics = {k: float(latest[k]) for k in STAGE_METRICS if k in latest}
    except Exception as exc:  # MlflowException: not in this store (deleted, another server)
        trace.notes.append(f"stage run {run_id} not found ({error_summary(exc, 200)})")
        return trace
    try:
        history = client.get_metric_history(run_id, "loss")
        trace.losses = sorted((int(m.step), float(m.value)) for m in history)
    except Exception as exc:
        trace.notes.append(f"loss history of run {run_id} not available ({error_summary(exc, 200)})")
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
        if not trace.losses and "losses.jsonl" in names:
            lines = _download(tracking_uri, run_id, "losses.jsonl", dest).read_text().splitlines()
            trace.losses = [(i + 1, float(json.loads(line)["loss"])) for i, line in enumerate(lines) if line]
        during = sorted(a.path for a in client.list_artifacts(run_id, "samples") if a.path.endswith(".png"))
        for path in _spread(during, MAX_GRIDS):
            step = Path(path).stem.removeprefix("samples-").lstrip("0") or "0"
            trace.grids.append((f"EMA weights at step {step}", _download(tracking_uri, run_id, path, dest)))
        if "samples.png" in names:
            trace.grids.append(("end of stage", _download(tracking_uri, run_id, "samples.png", dest)))
        elif not during:
            trace.notes.append(f"run {run_id} has no sample grids")
    except Exception as exc:
        trace.notes.append(f"artifacts of run {run_id} not available ({error_summary(exc, 200)})")
    if not trace.losses:
        trace.notes.append(f"run {run_id} logged no loss values")
    return trace


def build_registration_report(registration: Registration, tags: dict[str, str], tracking_uri: str) -> str:
    """The report's HTML for ``registration`` (``tags``: the lineage tags the version was given)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    name, version = registration.name, registration.version
    notes: list[str] = []
    summary = ""
    try:
        version_tags = dict(client.get_model_version(name, version).tags or {})
        summary = version_tags.get("promotion", "")
    except Exception as exc:
        version_tags = {}
        notes.append(f"model version {name} v{version} not readable ({error_summary(exc, 200)})")
    tags = {**version_tags, **{k: v for k, v in tags.items() if v}}
    with tempfile.TemporaryDirectory(prefix="register-report-") as tmp:
        work = Path(tmp)
        challenger, payload = fetch_evaluation(
            tracking_uri, tags.get("run.evaluate", ""), f"challenger v{version}", work / "challenger", notes
        )
        champion = champion_metrics = None
        if registration.champion:
            label = f"champion v{registration.champion}"
            try:
                champion_tags = dict(client.get_model_version(name, registration.champion).tags or {})
            except Exception as exc:
                champion_tags = {}
                notes.append(f"{label} not readable ({error_summary(exc, 200)})")
            champion_metrics = tag_metrics(champion_tags)
            champion, _ = fetch_evaluation(
                tracking_uri, champion_tags.get("run.evaluate", ""), label, work / "champion", notes
            )
        else:
            notes.append("no champion was compared against: the challenger's images are shown alone")
        stages = [
            stage_trace(client, tracking_uri, stage, tags.get(f"run.{stage}", ""), work / stage)
            for stage in STAGES
            if stage not in OPTIONAL_STAGES or tags.get(f"run.{stage}")
        ]
        decision = Decision(
            registration.promoted,
            list(registration.reasons),
            list(registration.notes),
            list(registration.aliases),
            summary,
            registration.champion,
        )
        lineage = {"registered model": f"{name} v{version}", "registration MLflow run": registration.run_id}
        lineage |= {label: tags.get(key, "") for key, label in LINEAGE}
        if registration.champion:
            lineage["champion compared against"] = f"{name} v{registration.champion}"
        metrics = registration.metrics or tag_metrics(tags)
        return build_report(
            f"Evaluation of {name} v{version}",
            subtitle=f"registered model <code>{name}</code> version {version}",
            metrics=metrics,
            challenger=challenger,
            champion=champion,
            champion_metrics=champion_metrics,
            not_run=payload.get("not_run"),
            decision=decision,
            stages=stages,
            lineage=lineage,
            notes=notes,
        )  # images are embedded before the temporary folder goes


def write_registration_report(
    registration: Registration, tags: dict[str, str], tracking_uri: str, path: Path
) -> Path:
    """Write the report to ``path`` and log it to the version's run as ``report.html``. Never
    raises for what it cannot fetch or log: a report that says what went wrong is written instead."""
    try:
        text = build_registration_report(registration, tags, tracking_uri)
    except Exception as exc:  # a bug or an unreachable store must not undo a registration
        log.exception("report for %s v%s", registration.name, registration.version)
        rows = {"error": error_summary(exc, 500), "version": f"{registration.name} v{registration.version}"}
        text = render(
            f"Evaluation of {registration.name} v{registration.version}",
            [("notes", "Report incomplete", key_value_table(rows))],
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if registration.run_id:
        try:
            from mlflow import MlflowClient

            with tempfile.TemporaryDirectory() as tmp:
                named = Path(tmp) / REPORT_ARTIFACT
                named.write_text(text, encoding="utf-8")
                MlflowClient(tracking_uri=tracking_uri).log_artifact(registration.run_id, str(named))
        except Exception as exc:
            log.warning("report not logged to run %s: %s", registration.run_id, error_summary(exc, 300))
    return path
