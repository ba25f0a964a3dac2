"""``python -m data_tools``: build the offline sample dataset."""

from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sample data tooling.")


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Option(help="root of the raw data")] = Path("data/raw"),
    synthetic_n: Annotated[int, typer.Option(min=1, help="number of synthetic scenes")] = 512,
    size: Annotated[int, typer.Option(min=64, help="synthetic image side in pixels")] = 128,
    seed: int = 0,
    tuxpaint: Annotated[int, typer.Option(min=0, help="Tux Paint stamps with en/zh captions (0: none)")] = 64,
    photos: Annotated[int, typer.Option(min=0, help="photographs from Debian packages (0: none)")] = 32,
    bundled: Annotated[
        bool, typer.Option(help="the photographs bundled in the scikit-image / scikit-learn wheels")
    ] = True,
    cache_dir: Annotated[Path, typer.Option(help="cache for downloaded Debian packages")] = Path(
        ".cache/debian"
    ),
    vae: Annotated[
        bool,
        typer.Option(
            help="train the tiny profile's VAE on the synthetic scenes into <out>/../vae/tiny"
            " (reused while the scenes are unchanged)"
        ),
    ] = True,
) -> None:
    """Build the sample set: synthetic scenes and the photographs inside installed wheels (offline),
    plus real images from Debian packages when apt can reach a mirror (each real source is optional
    and says why it is absent); then the tiny profile's VAE trained on the scenes (model.vae_training)."""
    from data_tools.bundled import build_bundled
    from data_tools.debian import SourceUnavailable
    from data_tools.debian_photos import build_photos
    from data_tools.synthetic import build_synthetic
    from data_tools.tuxpaint import build_tuxpaint

    typer.echo(str(build_synthetic(out / "synthetic", n=synthetic_n, size=size, seed=seed)))
    if bundled:
        try:
            typer.echo(str(build_bundled(out / "bundled")))
        except SourceUnavailable as exc:
            typer.echo(f"skipped bundled: {exc}", err=True)
    for name, count, build in (("tuxpaint", tuxpaint, build_tuxpaint), ("photos", photos, build_photos)):
        if not count:
            continue
        try:
            typer.echo(str(build(out / name, cache_dir, limit=count, seed=seed)))
        except SourceUnavailable as exc:
            typer.echo(f"skipped {name}: {exc}", err=True)
    if vae:  # beside raw/ (not in the ingest source), versioned by DVC with the data
        from model.vae_training import trained_vae

        typer.echo(str(trained_vae(out / "synthetic", out.parent / "vae" / "tiny")))


@app.command("noop", hidden=True)
def _noop() -> None:  # keeps typer in multi-command mode
    pass


if __name__ == "__main__":
    run_cli(app)
