"""KFP wrappers for recaption: one task per plan group (a GPU each on a cluster) and the fan-in.

(No ``from __future__ import annotations``: KFP reads real annotations.)
"""

from typing import List

from kfp.dsl import Dataset, Input, Output

from components.image import lumina_component


@lumina_component
def recaption_group_op(
    group: str,
    dataset_hash: str,
    captions: Output[Dataset],
    backend: str = "auto",
    vlm_model: str = "",
    vlm_config_json: str = "",
) -> str:
    """Caption one group's kept images (``dataset_hash``: the ingest fan-in this depends on);
    ``vlm_config_json``: the captioner settings of :class:`RecaptionConfig` (perspectives,
    languages, pixel limits, batch size, new tokens) as JSON."""
    from common.process import start_step

    start_step()
    from components.plan.plan import Group
    from components.recaption.config import RecaptionConfig
    from components.recaption.recaption import recaption_group, vlm_function

    settings = RecaptionConfig.model_validate_json(vlm_config_json or "{}")
    vlm = vlm_function(vlm_model, **settings.captioner_kwargs()) if vlm_model else None
    result = recaption_group(Group.from_json(group), captions.path, backend=backend, vlm=vlm, progress=False)
    captions.metadata.update({"images": result.images, "failed": result.failed, "ingest": dataset_hash})
    return result.dataset_hash


@lumina_component
def captions_merge_op(groups: List[str], parts: Input[List[Dataset]], captions: Output[Dataset],
                      backend: str = "auto") -> str:  # fmt: skip
    """Fan-in: one captions table and training manifest, the caption gate on the whole; returns the
    captions' content hash."""
    from common.process import start_step

    start_step()
    from pathlib import Path

    import pandas as pd

    from components.ingest.gate import tracked_gate
    from components.plan.plan import Group
    from components.recaption.gate import run_caption_gate
    from components.recaption.recaption import merge_captions

    result = merge_captions([p.path for p in parts], [Group.from_json(g) for g in groups], captions.path)
    tags = {"dataset_hash": result.dataset_hash, "backend": backend}
    tracked_gate(
        lambda: run_caption_gate(pd.read_parquet(result.captions), Path(captions.path)), "recaption", tags
    )
    captions.metadata.update(
        {"dataset_hash": result.dataset_hash, "images": result.images, "failed": result.failed}
    )
    return result.dataset_hash
