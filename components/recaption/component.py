"""KFP wrapper for recaption (no ``from __future__ import annotations``: KFP reads real annotations)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def recaption_op(
    images: Input[Dataset], captions: Output[Dataset], backend: str = "auto", vlm_model: str = ""
) -> str:
    """Caption the ingested images, run the caption gate, return the captions' content hash."""
    from model.logs import configure_logging_if_requested

    configure_logging_if_requested()  # JSON records on a cluster (LUMINA_LOG_FORMAT set on the task)
    from pathlib import Path

    import pandas as pd

    from components.ingest.gate import tracked_gate
    from components.recaption.gate import run_caption_gate
    from components.recaption.recaption import run_recaption, vlm_function

    vlm = vlm_function(vlm_model) if vlm_model else None
    result = run_recaption(images.path, captions.path, backend=backend, vlm=vlm, progress=False)
    tags = {"dataset_hash": result.dataset_hash, "backend": backend}
    tracked_gate(
        lambda: run_caption_gate(pd.read_parquet(result.captions), Path(captions.path)), "recaption", tags
    )
    captions.metadata.update(
        {"dataset_hash": result.dataset_hash, "images": result.images, "failed": result.failed}
    )
    return result.dataset_hash
