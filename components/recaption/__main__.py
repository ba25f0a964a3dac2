"""``python -m components.recaption INGEST_DIR OUT_DIR``: caption, then run the caption gate."""

import json
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(
    add_completion=False, help="UniCap recaption: multi-granularity, multi-perspective en/zh captions."
)


@app.command()
def run(
    dataset: Annotated[Path, typer.Argument(help="ingest output folder (manifest.parquet + images/)")],
    out_dir: Annotated[Path, typer.Argument(help="output folder")],
    config: Annotated[
        Path | None, typer.Option(help="recaption config YAML (components/recaption/config.py)")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="auto | metadata | alt-text | vlm")] = None,
    vlm_model: Annotated[
        str | None, typer.Option(help="Qwen2-VL hub id or local folder for the vlm backend")
    ] = None,
    perspectives: Annotated[
        str | None,
        typer.Option(help="perspectives the vlm asks for: all (default), none, or e.g. style,objects,ocr"),
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="vlm input pixel cap (default: the processor's own budget)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="prompts per generate call")] = None,
) -> None:
    """Caption every image; failures go to failures.csv; a failed gate exits with code 2."""
    import pandas as pd

    from components.recaption.config import parse_perspectives, recaption_config
    from components.recaption.gate import run_caption_gate
    from components.recaption.recaption import run_recaption, vlm_function

    cfg = recaption_config(
        config,
        backend=backend,
        vlm_model=vlm_model,
        perspectives=parse_perspectives(perspectives) if perspectives is not None else None,
        max_pixels=max_pixels,
        batch_size=batch_size,
    )
    vlm = vlm_function(cfg.vlm_model, **cfg.captioner_kwargs()) if cfg.vlm_model else None
    result = run_recaption(dataset, out_dir, backend=cfg.backend, vlm=vlm)
    run_caption_gate(pd.read_parquet(result.captions), out_dir)
    typer.echo(
        json.dumps({"images": result.images, "failed": result.failed, "dataset_hash": result.dataset_hash})
    )


if __name__ == "__main__":
    run_cli(app)
