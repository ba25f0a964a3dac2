"""KFP wrapper for ingest (no ``from __future__ import annotations``: KFP reads real annotations)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def ingest_op(
    source: str,
    dataset: Output[Dataset],
    min_side: int = 32,
    dedup_distance: int = 4,
    captions_file: str = "",
) -> str:
    """Ingest ``source`` into the output dataset (captions from ``captions_file``, a sidecar table, when
    given), run the gate, return the dataset hash."""
    from model.logs import configure_logging_if_requested

    configure_logging_if_requested()  # JSON records on a cluster (LUMINA_LOG_FORMAT set on the task)
    from pathlib import Path

    import pandas as pd

    from components.ingest.gate import run_gate, tracked_gate
    from components.ingest.ingest import IngestOptions, ingest

    out = Path(dataset.path)
    opts = IngestOptions(min_side=min_side, dedup_distance=dedup_distance)
    result = ingest(source, out, opts, captions=captions_file or None)
    tags = {"dataset_hash": result.dataset_hash, "source": source}
    tracked_gate(lambda: run_gate(pd.read_parquet(result.manifest), out), "ingest", tags)
    dataset.metadata.update(
        {"dataset_hash": result.dataset_hash, "kept": result.kept, "rejected": result.rejected}
    )
    return result.dataset_hash
