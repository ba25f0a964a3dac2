"""``lumina`` command line: build, inspect, sample and calibrate models.

Errors a user can fix (bad profile, bad size, missing weights) end with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lumina-Image 2.0 model tools.")
log = logging.getLogger("lumina")


@app.command()
def info(profile: Annotated[str, typer.Option(help="tiny | small | full")] = "tiny") -> None:
    """Print a profile's configuration and transformer parameter count (built on the meta device)."""
    from model.params import count_transformer_params
    from model.profiles import get_profile

    spec = get_profile(profile)
    result = {"profile": spec.name, "transformer_params": count_transformer_params(spec), **spec.model_dump()}
    typer.echo(json.dumps(result, indent=2))


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="folder to write the diffusers pipeline to")],
    profile: Annotated[str, typer.Option(help="tiny | small")] = "tiny",
    seed: int = 0,
    random_init: Annotated[bool, typer.Option(help="keep random adaLN/final layers (no zero-init)")] = False,
) -> None:
    """Build a random-weight pipeline for a profile (offline) and save it in diffusers format."""
    from model.checkpoint import build_pipeline, save_pipeline

    pipe = build_pipeline(profile, seed=seed, zero_init=not random_init)
    typer.echo(str(save_pipeline(pipe, out)))


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="diffusers pipeline folder or hub id")],
    prompt: Annotated[list[str], typer.Option(help="prompt (repeat for a batch)")],
    out: Annotated[Path, typer.Option(help="output folder for PNGs")] = Path("outputs/samples"),
    negative_prompt: str = "",
    height: Annotated[int, typer.Option(help="pixels (with --task: of the whole dual-panel grid)")] = 1024,
    width: Annotated[int, typer.Option(help="pixels (with --task: of the whole dual-panel grid)")] = 1024,
    steps: int = 30,
    guidance: float = 4.0,
    cfg_trunc: float = 0.25,
    renorm: float = 1.0,
    solver: str = "euler",
    shift: float | None = None,
    teacache: float = 0.0,
    system_prompt: Annotated[
        str | None, typer.Option(help="A | B | C | none (default B, C with --task)")
    ] = None,
    seed: int = 0,
    device: str = "cpu",
    task: Annotated[
        str | None,
        typer.Option(
            help="dual-panel Template C grid: depth | canny | sketch | mask (generate the map) or "
            "image-from-depth | image-from-canny | image-from-sketch | image-from-mask (generate the image)"
        ),
    ] = None,
    layout: Annotated[
        str, typer.Option(help="upper-lower | left-right (image first, map second)")
    ] = "upper-lower",
    condition_image: Annotated[
        Path | None, typer.Option(help="known panel (needs --task): its image, or its map for image-from-*")
    ] = None,
    full_grid: Annotated[
        bool, typer.Option(help="save the whole grid, not just the generated panel")
    ] = False,
) -> None:
    """Generate images with our sampler; with --task a dual-panel grid, kept to --condition-image."""
    from common.errors import ConfigError
    from model.sampler import LuminaSampler, SamplerConfig
    from model.sampler.conditioning import PanelCondition, panel_size, read_image

    condition, image = None, None
    if condition_image is not None and task is None:
        raise ConfigError("--condition-image needs --task (what the known panel is)")
    if task is not None:
        # checked before the model loads: a bad task, layout, grid size or image fails at once
        condition = PanelCondition(
            layout, task, output="grid" if full_grid or condition_image is None else "panel"
        )
        panel_size(condition.layout, height, width)
        image = read_image(condition_image) if condition_image is not None else None
    config = SamplerConfig(
        steps=steps,
        guidance_scale=guidance,
        cfg_trunc=cfg_trunc,
        renorm=renorm,
        solver=solver,
        shift=shift,
        teacache=teacache,
        system_prompt=system_prompt or ("C" if task is not None else "B"),
    )
    sampler = LuminaSampler.load(model, device=device)
    if image is not None:
        condition = PanelCondition.from_image(
            image, task=condition.task, layout=condition.layout, height=height, width=width,
            vae=sampler.vae, output=condition.output,
        )  # fmt: skip
    result = sampler.generate(
        prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        seed=seed,
        config=config,
        progress=True,
        condition=condition,
    )
    out.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(result.images):
        path = out / f"{seed:06d}_{i:02d}.png"
        picture.save(path)
        typer.echo(str(path))
    typer.echo(
        f"model calls: {result.forward_calls}, guided steps: {result.guided_steps}, "
        f"teacache skipped: {result.teacache_skipped}"
    )


@app.command("calibrate-teacache")
def calibrate_teacache(
    model: Annotated[str, typer.Option(help="diffusers pipeline folder (teacache.json is written there)")],
    height: int = 1024,
    width: int = 1024,
    steps: int = 30,
    device: str = "cpu",
) -> None:
    """Fit TeaCache's rescale polynomial for a model and store it beside the weights."""
    from model.sampler import LuminaSampler, SamplerConfig
    from model.sampler.calibrate import calibrate

    sampler = LuminaSampler.load(model, device=device)
    folder = Path(model) if Path(model).is_dir() else None
    result = calibrate(sampler, height=height, width=width, config=SamplerConfig(steps=steps), out_dir=folder)
    typer.echo(json.dumps(result, indent=2))


def main() -> None:
    """Entry point of the ``lumina`` command."""
    run_cli(app)


if __name__ == "__main__":
    main()
