"""KFP wrappers for tiering: quality scores per plan group, then the global tiers (fan-in).

(No ``from __future__ import annotations``: KFP reads real annotations.)
"""

from typing import List

from kfp.dsl import Dataset, Input, Output

from components.image import lumina_component


@lumina_component
def score_group_op(captions: Input[Dataset], scores: Output[Dataset]) -> str:
    """Score one group's captioned images (raw scores; ranks and quotas are the fan-in's)."""
    from common.process import start_step

    start_step()
    from components.tier.tier import score_group

    path = score_group(captions.path, scores.path, progress=False)
    return str(path)


@lumina_component
def tier_op(
    captions: Input[List[Dataset]],
    scores: Input[List[Dataset]],
    groups: List[str],
    tiers: Output[Dataset],
    config_json: str = "",
) -> str:
    """Fan-in: nested tiers (lowres ⊇ highres ⊇ hq) with the 100:10:1 quotas over the whole set;
    returns the tiers' content hash."""
    from common.process import start_step

    start_step()
    from components.plan.plan import Group
    from components.tier.tier import tier_groups
    from components.tier.tiering import TierConfig

    config = TierConfig.model_validate_json(config_json) if config_json else TierConfig()
    plan_groups = [Group.from_json(g) for g in groups]
    result = tier_groups(
        [c.path for c in captions], [s.path for s in scores], tiers.path, config, plan_groups
    )
    tiers.metadata.update(
        {"dataset_hash": result.dataset_hash, **{f"n_{k}": v for k, v in result.counts.items()}}
    )
    return result.dataset_hash
