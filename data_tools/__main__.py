"""``python -m data_tools``: build the offline sample dataset."""

from pathlib import Path
from typing import Annotated

import typer

from model.cli_errors import run_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sample data tooling.")


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Option(help="root of the raw data")] = Path("data/raw"),
    synthetic_n: Annotated[int, typer.Option(min=1, help="number of synthetic scenes")] = 128,
    size: Annotated[int, typer.Option(min=64, help="synthetic image side in pixels")] = 128,
    seed: int = 0,
) -> None:
    """Build the synthetic compositional set (always works offline)."""
    from data_tools.synthetic import build_synthetic

    typer.echo(str(build_synthetic(out / "synthetic", n=synthetic_n, size=size, seed=seed)))


@app.command("noop", hidden=True)
def _noop() -> None:  # keeps typer in multi-command mode
    pass


if __name__ == "__main__":
    run_cli(app)
