"""KFP wrappers for ingest: one task per plan group, and the fan-in that merges them.

(No ``from __future__ import annotations``: KFP reads real annotations.)
"""

from typing import List

from kfp.dsl import Dataset, Input, Output

from components.image import lumina_component


@lumina_component
def ingest_group_op(group: str, manifest: Output[Dataset], min_side: int = 32, shard_size: int = 1000) -> str:
    """Ingest one plan group into tar shards under its prefix; the artifact holds its candidate
    manifest and rejects. Returns the group name."""
    from common.process import start_step

    start_step()
    from components.ingest.group import ingest_group
    from components.ingest.ingest import IngestOptions
    from components.plan.plan import Group

    plan_group = Group.from_json(group)
    result = ingest_group(plan_group, manifest.path, IngestOptions(min_side=min_side, shard_size=shard_size),
                          progress=False)  # fmt: skip
    manifest.metadata.update(
        {"group": result.group, "candidates": result.candidates, "rejected": result.rejected}
    )
    return result.group


@lumina_component
def ingest_merge_op(
    groups: List[str],
    parts: Input[List[Dataset]],
    source: str,
    dataset: Output[Dataset],
    min_side: int = 32,
    dedup_distance: int = 4,
    captions_file: str = "",
) -> str:
    """Fan-in: global duplicate decisions, the caption sidecar and the great_expectations gate on
    the whole manifest; returns the dataset hash."""
    from common.process import start_step

    start_step()
    from pathlib import Path

    import pandas as pd

    from components.ingest.gate import run_gate, tracked_gate
    from components.ingest.ingest import IngestOptions
    from components.ingest.merge import merge_groups
    from components.plan.plan import Group

    opts = IngestOptions(min_side=min_side, dedup_distance=dedup_distance)
    plan_groups = [Group.from_json(g) for g in groups]
    folders = [p.path for p in parts]
    result = merge_groups(folders, plan_groups, dataset.path, opts, captions=captions_file or None,
                          source_root=source)  # fmt: skip
    tags = {"dataset_hash": result.dataset_hash, "source": source}
    tracked_gate(lambda: run_gate(pd.read_parquet(result.manifest), Path(dataset.path)), "ingest", tags)
    dataset.metadata.update(
        {
            "dataset_hash": result.dataset_hash,
            "kept": result.kept,
            "rejected": result.rejected,
            "groups": len(plan_groups),
        }
    )
    return result.dataset_hash
