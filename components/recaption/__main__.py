"""``python -m components.recaption INGEST_DIR OUT_DIR``: caption, then run the caption gate."""

import json
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, help="UniCap recaption: multi-granularity en/zh captions.")


@app.command()
def run(
    dataset: Annotated[Path, typer.Argument(help="ingest output folder (manifest.parquet + images/)")],
    out_dir: Annotated[Path, typer.Argument(help="output folder")],
    backend: Annotated[str, typer.Option(help="auto | metadata | alt-text | vlm")] = "auto",
    vlm_model: Annotated[str, typer.Option(help="Qwen2-VL hub id or local folder for the vlm backend")] = "",
    max_pixels: Annotated[int, typer.Option(help="vlm input pixel cap")] = 512 * 28 * 28,
    batch_size: int = 4,
) -> None:
    """Caption every image; failures go to failures.csv; a failed gate exits with code 2."""
    import pandas as pd

    from components.recaption.gate import run_caption_gate
    from components.recaption.recaption import run_recaption, vlm_function

    vlm = vlm_function(vlm_model, max_pixels=max_pixels, batch_size=batch_size) if vlm_model else None
    result = run_recaption(dataset, out_dir, backend=backend, vlm=vlm)
    run_caption_gate(pd.read_parquet(result.captions), out_dir)
    typer.echo(
        json.dumps({"images": result.images, "failed": result.failed, "dataset_hash": result.dataset_hash})
    )


if __name__ == "__main__":
    run_cli(app)
