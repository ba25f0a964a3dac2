"""KFP wrapper for evaluation (no ``from __future__ import annotations``: KFP reads real annotations)."""

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.image import lumina_component


@lumina_component
def evaluate_op(
    model: Input[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    config_json: str = "",
    mlflow_tracking_uri: str = "",
    heldout: Input[Dataset] = None,
    baseline: Input[Model] = None,
    compare_baseline: bool = False,
) -> str:
    """Evaluate the final stage; logs to MLflow when a tracking URI is given; returns metrics JSON.
    ``heldout``: the tier step's held-out manifest (or tier folder): ``val_loss`` on those images.
    ``baseline`` with ``compare_baseline`` (the unified phase ran): the model before that phase,
    whose grid-panel metrics are reported beside the final model's (``*_before``)."""
    from common.process import start_step

    start_step()  # JSON records on a cluster (LUMINA_LOG_FORMAT set on the task), a quick exit
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from components.evaluate.evaluate import EvalConfig, log_evaluation, run_evaluation

    cfg = EvalConfig.model_validate_json(config_json) if config_json else EvalConfig()
    out = Path(tempfile.mkdtemp(prefix="evaluate-"))
    held = Path(heldout.path) if heldout is not None else None
    held = held / "heldout.parquet" if held is not None and held.is_dir() else held
    held = held if held is not None and held.is_file() else None  # tiers from before the split: scenes
    before = baseline.path if baseline is not None and compare_baseline else None
    try:  # the images live on in MLflow (log_evaluation) and in the report; the folder goes
        result = run_evaluation(model.path, out, cfg, progress=False, heldout=held, baseline=before)
        for key, value in result.metrics.items():
            metrics.log_metric(key, value)
        shutil.copy(result.report_path, report.path)
        uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        run_id = log_evaluation(result, out, uri, tags={"model": model.path}) if uri else ""
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return json.dumps({"metrics": result.metrics, "run_id": run_id})
