"""KFP wrapper for the per-group grid step (no ``from __future__ import annotations``: KFP reads
real annotations)."""

from kfp.dsl import Dataset, Output

from components.image import lumina_component


@lumina_component
def grids_group_op(
    group: str,
    tiers_hash: str,
    grids: Output[Dataset],
    profile: str = "tiny",
    seed: int = 0,
    enabled: bool = False,
    config_json: str = "",
) -> str:
    """Build one group's Template C grids and the unified phase's mix (``enabled``; else an empty
    output); the grid images go into shards beside the group's, the artifact holds the rows.
    ``config_json``: :class:`components.grids.grid.GridConfig` fields. Returns the summary JSON."""
    from common.process import start_step

    start_step()
    import json

    from components.grids.grid import parse_grid_config
    from components.grids.group import grids_group
    from components.plan.plan import Group

    plan_group = Group.from_json(group)
    config = parse_grid_config(config_json)  # a one-line error for bad JSON or a bad field
    summary = grids_group(plan_group, grids.path, profile=profile, config=config, seed=seed, enabled=enabled)
    grids.metadata.update({"group": plan_group.name, "grids": summary.get("grids", 0), "tiers": tiers_hash})
    return json.dumps(summary, ensure_ascii=False)
