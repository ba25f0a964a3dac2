"""``python -m components.evaluate MODEL_DIR OUT_DIR``: evaluate a trained pipeline."""

import json
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, help="Benchmark evaluation of a trained pipeline.")


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="diffusers pipeline folder")],
    out_dir: Annotated[Path, typer.Argument(help="output folder (images, metrics.json, report.html)")],
    suite: Annotated[list[str] | None, typer.Option(help="suites (default: all)")] = None,
    suite_size: Annotated[int, typer.Option(help="prompts per category per suite")] = 2,
    synthetic_size: Annotated[int, typer.Option(help="held-out synthetic prompts")] = 64,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 128,
    steps: int = 20,
    mlflow_tracking_uri: Annotated[str, typer.Option(help="log the result to this MLflow")] = "",
    clip_model: Annotated[str | None, typer.Option(help="CLIP hub id or folder for the CLIP score")] = None,
) -> None:
    """Write metrics.json, report.html and the generated images."""
    from components.evaluate.evaluate import EvalConfig, log_evaluation, run_evaluation
    from model.prompts import SystemPrompt
    from model.sampler import SamplerConfig

    cfg = EvalConfig(
        suite_size=suite_size,
        synthetic_size=synthetic_size,
        height=size,
        width=size,
        sampler=SamplerConfig(steps=steps, system_prompt=SystemPrompt.B),
        **({"suites": suite} if suite else {}),
    )
    result = run_evaluation(model, out_dir, cfg)
    if mlflow_tracking_uri:
        log_evaluation(result, out_dir, mlflow_tracking_uri)
    typer.echo(json.dumps({"metrics": result.metrics, "report": str(result.report_path)}))


if __name__ == "__main__":
    run_cli(app)
