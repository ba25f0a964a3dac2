"""Compile the cluster pipeline to YAML (committed as ``pipelines/lumina_pipeline.yaml``)."""

from __future__ import annotations

from pathlib import Path


def compile_pipeline(out: Path, cluster_yaml: Path | None = None) -> Path:
    from kfp import compiler

    from common.config_files import read_yaml_mapping
    from pipelines.lumina_pipeline import ClusterSettings, build_pipeline

    overrides = read_yaml_mapping(cluster_yaml, "cluster settings") if cluster_yaml else {}
    settings = ClusterSettings.model_validate(overrides)
    compiler.Compiler().compile(build_pipeline(settings), str(out))
    return out
