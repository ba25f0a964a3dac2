"""Compile the cluster pipeline to YAML (committed as ``pipelines/lumina_pipeline.yaml``)."""

from __future__ import annotations

from pathlib import Path

import yaml


def compile_pipeline(out: Path, cluster_yaml: Path | None = None) -> Path:
    from kfp import compiler

    from pipelines.lumina_pipeline import ClusterSettings, build_pipeline

    overrides = yaml.safe_load(cluster_yaml.read_text()) if cluster_yaml else {}
    settings = ClusterSettings.model_validate(overrides or {})
    compiler.Compiler().compile(build_pipeline(settings), str(out))
    return out
