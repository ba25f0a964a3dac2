"""``python -m components.ingest SOURCE OUT_DIR``: ingest then run the great_expectations gate."""

import json
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, help="Ingest images into a checked, deduplicated manifest.")


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="folder (images, .tar shards), a .tar shard or s3:// prefix")],
    out_dir: Annotated[Path, typer.Argument(help="output folder (a rerun resumes into it)")],
    min_side: Annotated[int, typer.Option(min=1)] = 32,
    max_aspect: Annotated[float, typer.Option(min=1.0)] = 4.0,
    dedup_distance: Annotated[int, typer.Option(help="perceptual-hash bits; negative: off")] = 4,
    workers: Annotated[int, typer.Option(min=1, help="decode threads")] = 2,
    in_flight: Annotated[int, typer.Option(min=1, help="files read ahead at most (memory bound)")] = 64,
    shard_size: Annotated[
        int, typer.Option(min=1, help="images per output shard (each one a checkpoint)")
    ] = 1000,
    group_size: Annotated[
        int, typer.Option(min=1, help="source entries per group (the fan-out unit)")
    ] = 5000,
    captions: Annotated[
        Path | None, typer.Option(help="caption sidecar table: .csv/.tsv/.jsonl/.parquet with key + caption")
    ] = None,
) -> None:
    """Ingest; bad files go to rejects.csv; a failed gate exits with code 2."""
    from components.ingest.gate import run_gate
    from components.ingest.ingest import IngestOptions, ingest

    opts = IngestOptions(
        min_side=min_side,
        max_aspect=max_aspect,
        dedup_distance=dedup_distance,
        workers=workers,
        in_flight=in_flight,
        shard_size=shard_size,
    )
    result = ingest(source, out_dir, opts, captions=captions, group_size=group_size)
    run_gate(pd.read_parquet(result.manifest), out_dir)
    typer.echo(
        json.dumps({"kept": result.kept, "rejected": result.rejected, "dataset_hash": result.dataset_hash})
    )


if __name__ == "__main__":
    run_cli(app)
