"""KFP wrapper for ingest (no ``from __future__ import annotations``: KFP reads real annotations)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def ingest_op(source: str, dataset: Output[Dataset], min_side: int = 32, dedup_distance: int = 4) -> str:
    """Ingest ``source`` into the output dataset, run the gate, return the dataset hash."""
    from pathlib import Path

    import pandas as pd

    from components.ingest.gate import run_gate, tracked_gate
    from components.ingest.ingest import IngestOptions, ingest

    out = Path(dataset.path)
    result = ingest(source, out, IngestOptions(min_side=min_side, dedup_distance=dedup_distance))
    tags = {"dataset_hash": result.dataset_hash, "source": source}
    tracked_gate(lambda: run_gate(pd.read_parquet(result.manifest), out), "ingest", tags)
    dataset.metadata.update(
        {"dataset_hash": result.dataset_hash, "kept": result.kept, "rejected": result.rejected}
    )
    return result.dataset_hash
