"""``python -m components.train``: run one training stage (also under torchrun / deepspeed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, help="DeepSpeed stage training of Unified Next-DiT.")


@app.command()
def run(
    manifest: Annotated[Path, typer.Option(help="the stage's tier manifest (Parquet) or the tier folder")],
    output_dir: Annotated[Path, typer.Option(help="stage output: checkpoints/, pipeline/, losses.jsonl")],
    stage: Annotated[str | None, typer.Option(help="lowres | highres | hq (default lowres)")] = None,
    profile: Annotated[str | None, typer.Option(help="tiny | small | full (default tiny)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with any TrainConfig field")] = None,
    init_from: Annotated[Path | None, typer.Option(help="previous stage's pipeline folder")] = None,
    image_root: Annotated[Path | None, typer.Option(help="root for relative image paths")] = None,
    latents: Annotated[
        Path | None, typer.Option(help="latent index (Parquet or folder) from components.latents")
    ] = None,
    steps: int | None = None,
    seed: int | None = None,
) -> None:
    """Train one stage; rerunning the same command resumes from the last checkpoint."""
    from components.train.config import load_config, stage_config
    from components.train.data import stage_manifest
    from components.train.trainer import train_stage

    overrides = {"manifest": stage_manifest(manifest, stage or "lowres"), "output_dir": output_dir}
    for key, value in (
        ("init_from", init_from),
        ("image_root", image_root),
        ("latents", latents),
        ("steps", steps),
        ("seed", seed),
    ):
        if value is not None:
            overrides[key] = value
    if config is not None:
        chosen = {k: v for k, v in (("stage", stage), ("profile", profile)) if v is not None}
        cfg = load_config(config, **chosen, **overrides)
    else:
        cfg = stage_config(stage or "lowres", profile or "tiny", **overrides)
    result = train_stage(cfg)
    typer.echo(
        json.dumps({"pipeline": str(result.pipeline_dir), "steps": result.steps, "loss": result.final_loss})
    )


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
