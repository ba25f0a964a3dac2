"""KFP wrapper for the per-group latent step (no ``from __future__ import annotations``: KFP reads
real annotations)."""

from kfp.dsl import Dataset, Input, Output

from components.image import lumina_component


@lumina_component
def latents_group_op(
    group: str,
    tiers_hash: str,
    index: Output[Dataset],
    profile: str = "tiny",
    seed: int = 0,
    base_model: str = "",
    vae: str = "",
    grids: Input[Dataset] = None,
) -> str:
    """Encode one group's tiered images at each stage resolution into bf16 safetensors beside its
    shards; the artifact holds the group's latent indexes (``tiers_hash``: the tiers it follows).
    ``vae``: a trained VAE folder for the first stage ("": the profile's own). ``grids``: the
    group's grid step output (the unified phase's grids and mix), when the pipeline has one."""
    from common.process import start_step

    start_step()
    from components.latents.group import latents_group
    from components.plan.plan import Group

    plan_group = Group.from_json(group)
    files = latents_group(plan_group, index.path, profile=profile, seed=seed, base_model=base_model, vae=vae,
                          grids=grids.path if grids is not None else None)  # fmt: skip
    index.metadata.update({"group": plan_group.name, "indexes": len(files), "tiers": tiers_hash})
    return plan_group.name
