"""KFP wrapper for registration (no ``from __future__ import annotations``: KFP reads real annotations)."""

from typing import List, NamedTuple

from kfp.dsl import HTML, Input, Model, Output

from components.image import lumina_component


@lumina_component
def register_op(
    model: Input[Model],
    report: Output[HTML],
    eval_result: str,
    model_name: str,
    profile: str = "",
    data_version: str = "",
    dataset_hash: str = "",
    captions_hash: str = "",
    tiers_hash: str = "",
    lowres_run: str = "",
    highres_run: str = "",
    hq_run: str = "",
    unified_run: str = "",
    git_sha: str = "",
    gate_json: str = "",
    mlflow_tracking_uri: str = "",
    source_fingerprint: str = "",
    pipeline_run: str = "",
) -> str:
    """Register the model version (tagged with data hashes, stage runs, metrics, git sha);
    ``champion`` only if the promotion gate passes; ``report``: the evaluation report with the gate
    decision, challenger beside champion, loss curves and lineage (also ``report.html`` in the
    version's MLflow run). Returns the registration as JSON."""
    from common.process import start_step

    start_step()  # JSON records on a cluster (LUMINA_LOG_FORMAT set on the task), a quick exit
    import json
    import os
    from dataclasses import asdict
    from pathlib import Path

    from components.register.register import PromotionGate, register_model
    from components.register.report import write_registration_report

    uri = mlflow_tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    gate = PromotionGate.model_validate_json(gate_json) if gate_json else PromotionGate()
    evaluation = json.loads(eval_result)
    tags = {
        "profile": profile,
        "data_version": data_version,
        "dataset_hash": dataset_hash,
        "captions_hash": captions_hash,
        "tiers_hash": tiers_hash,
        "run.lowres": lowres_run,
        "run.highres": highres_run,
        "run.hq": hq_run,
        "run.unified": unified_run,
        "run.evaluate": evaluation.get("run_id", ""),
        "git_sha": git_sha,
        "source_fingerprint": source_fingerprint,
        "pipeline_run": pipeline_run,  # a retried register step finds the version this run made
    }
    result = register_model(model.path, model_name, uri, evaluation["metrics"], gate=gate, tags=tags)
    write_registration_report(result, tags, uri, Path(report.path))
    return json.dumps(asdict(result))


@lumina_component
def new_data_op(
    groups: List[str], model_name: str, only_new_data: bool = False, mlflow_tracking_uri: str = ""
) -> NamedTuple("NewData", [("decision", str), ("fingerprint", str), ("reason", str)]):
    """``decision``: ``train``, or (``only_new_data``, e.g. a recurring run) ``unchanged`` when a
    version of ``model_name`` was already registered from a source with this plan's fingerprint."""
    from common.process import start_step

    start_step()
    import os
    from collections import namedtuple

    from components.plan.plan import source_fingerprint

    result = namedtuple("NewData", ["decision", "fingerprint", "reason"])
    fingerprint = source_fingerprint(groups)
    if not only_new_data:
        return result("train", fingerprint, "")
    from components.register.register import version_for_source  # MLflow and torch: 5 s of imports

    uri = mlflow_tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    version = version_for_source(model_name, fingerprint, uri)
    if version is None:
        return result("train", fingerprint, "")
    reason = (
        f"no new data: {model_name} version {version} was trained on this source (fingerprint {fingerprint})"
    )
    print(reason)
    return result("unchanged", fingerprint, reason)


@lumina_component
def nothing_new_op(reason: str) -> str:
    """The run's result when there was nothing new to train on (JSON ``{"skipped": reason}``)."""
    import json

    return json.dumps({"skipped": reason})
