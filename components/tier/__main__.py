"""``python -m components.tier CAPTIONS_DIR IMAGES_DIR OUT_DIR``: score and split into tiers."""

import json
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, help="Quality scoring and hierarchical data tiers.")


@app.command()
def run(
    captions: Annotated[Path, typer.Argument(help="recaption output folder")],
    images: Annotated[Path, typer.Argument(help="ingest output folder (image root)")],
    out_dir: Annotated[Path, typer.Argument(help="output folder")],
    config: Annotated[Path | None, typer.Option(help="YAML with TierConfig fields")] = None,
    scorer: Annotated[list[str] | None, typer.Option(help="scorers to run (default: all available)")] = None,
) -> None:
    """Write lowres/highres/hq manifests, scores and a report."""
    from common.config_files import read_yaml_mapping
    from components.tier.tier import run_tier
    from components.tier.tiering import TierConfig

    cfg = TierConfig.model_validate(read_yaml_mapping(config, "tier config")) if config else TierConfig()
    result = run_tier(captions, images, out_dir, cfg, scorer)
    typer.echo(
        json.dumps(
            {"counts": result.counts, "dataset_hash": result.dataset_hash, "report": str(result.report)}
        )
    )


if __name__ == "__main__":
    run_cli(app)
