"""KFP wrapper for tiering (no ``from __future__ import annotations``: KFP reads real annotations)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def tier_op(
    captions: Input[Dataset], images: Input[Dataset], tiers: Output[Dataset], config_json: str = ""
) -> str:
    """Score and split into nested tiers (lowres ⊇ highres ⊇ hq); returns the tiers' content hash."""
    from model.logs import configure_logging_if_requested

    configure_logging_if_requested()  # JSON records on a cluster (LUMINA_LOG_FORMAT set on the task)
    from components.tier.tier import run_tier
    from components.tier.tiering import TierConfig

    config = TierConfig.model_validate_json(config_json) if config_json else TierConfig()
    result = run_tier(captions.path, images.path, tiers.path, config, progress=False)
    tiers.metadata.update(
        {"dataset_hash": result.dataset_hash, **{f"n_{k}": v for k, v in result.counts.items()}}
    )
    return result.dataset_hash
