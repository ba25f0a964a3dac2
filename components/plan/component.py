"""KFP wrapper for the plan step (no ``from __future__ import annotations``: KFP reads real annotations)."""

from typing import List

from kfp.dsl import Dataset, Output

from components.image import lumina_component


@lumina_component
def plan_op(
    source: str,
    data_root: str,
    plan: Output[Dataset],
    group_size: int = 5000,
    min_side: int = 32,
    dedup_distance: int = 4,
) -> List[str]:
    """List ``source`` and split it into groups: returns the ParallelFor items (one JSON object per
    group). The listing's fingerprint, which keys every output written for it, is in the ``plan``
    artifact's metadata. (One unnamed output: kfp's local runner iterates only over ``Output``.)"""
    from common.process import start_step

    start_step()
    import json
    from pathlib import Path

    from components.ingest.ingest import IngestOptions
    from components.plan.plan import plan_source

    opts = IngestOptions(min_side=min_side, dedup_distance=dedup_distance)
    result = plan_source(source, data_root, group_size=group_size, options=opts.fingerprint_fields())
    Path(plan.path).mkdir(parents=True, exist_ok=True)
    summary = {"source": source, "key": result.key, "fingerprint": result.fingerprint,
               "groups": result.group_items}  # fmt: skip
    (Path(plan.path) / "plan.json").write_text(json.dumps(summary, indent=2))
    plan.metadata.update({"fingerprint": result.fingerprint, "groups": len(result.groups), "key": result.key})
    return result.group_items
