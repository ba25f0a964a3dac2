"""Dual-panel (Template C) generation and image-conditioned generation by panel replacement.

A Template C grid is one image of two panels, split ``upper-lower`` or ``left-right``: one panel
shows an image, the other a map of it (depth map, canny edge map, sketch or segmentation mask).
Which panel holds what follows the template's wording: the *map* is the lower / right panel, the
*image* the upper / left one ("the lower half displays a depth map, while the upper half retains
the original image").

Image conditioning keeps a known panel: before the first solver step and after every step, the
known panel's latents are replaced with the reference noised to the current model time on the flow
path, ``x_t = t * x_ref + (1 - t) * noise`` (:func:`model.flow.interpolate`; ``t = 1 - sigma``,
0 = noise, 1 = data), with one fixed noise draw per generation: the known panel's part of the
initial latents. At the end (``t = 1``) the known panel is the reference exactly; the model only
generates the other panel, seeing the known one at every step.

- task ``depth`` / ``canny`` / ``sketch`` / ``mask``: the image is known, the map is generated;
- task ``image-from-depth`` / ``image-from-canny`` / ``image-from-sketch`` / ``image-from-mask``:
  the map is known, the image is generated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps

from common.errors import ConfigError, first_line
from model.flow import interpolate
from model.profiles import VAE_DOWNSAMPLE
from model.prompts import panel_fill_ins
from model.sampler.solvers import StepHook

PANEL_MULTIPLE = VAE_DOWNSAMPLE * 2  # a panel is a whole number of transformer patches


class Layout(StrEnum):
    UPPER_LOWER = "upper-lower"
    LEFT_RIGHT = "left-right"


class Task(StrEnum):
    DEPTH = "depth"
    CANNY = "canny"
    SKETCH = "sketch"
    MASK = "mask"  # segmentation mask: each object in its own colour on black (the grids' kind)
    IMAGE_FROM_DEPTH = "image-from-depth"
    IMAGE_FROM_CANNY = "image-from-canny"
    IMAGE_FROM_SKETCH = "image-from-sketch"
    IMAGE_FROM_MASK = "image-from-mask"

    @property
    def kind(self) -> str:
        """The map kind: ``depth``, ``canny``, ``sketch`` or ``mask``."""
        return self.value.removeprefix("image-from-")

    @property
    def generates_map(self) -> bool:
        return not self.value.startswith("image-from-")


IMAGE_PANEL, MAP_PANEL = 0, 1  # first (upper / left) and second (lower / right) panel


def parse_task(name: str | Task) -> Task:
    try:
        return Task(str(name).lower())
    except ValueError:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(Task)}") from None


def parse_layout(name: str | Layout) -> Layout:
    try:
        return Layout(str(name).lower().replace("/", "-").replace("_", "-"))
    except ValueError:
        raise ConfigError(f"unknown layout {name!r}; choose one of: {', '.join(Layout)}") from None


def panel_size(layout: Layout | str, height: int, width: int) -> tuple[int, int]:
    """(height, width) of one panel of a ``height`` x ``width`` grid; :class:`ConfigError` when the
    split side is not twice a multiple of 16."""
    layout = parse_layout(layout)
    split, name = (height, "height") if layout is Layout.UPPER_LOWER else (width, "width")
    if split % (2 * PANEL_MULTIPLE) or split <= 0:
        raise ConfigError(
            f"{layout} grid {name} {split} must be a positive multiple of {2 * PANEL_MULTIPLE} "
            f"(two panels of a multiple of {PANEL_MULTIPLE} px)"
        )
    return (height // 2, width) if layout is Layout.UPPER_LOWER else (height, width // 2)


def panel_slices(layout: Layout, panel: int, height: int, width: int) -> tuple[slice, slice]:
    """(rows, columns) of ``panel`` (0 = upper / left) in a tensor whose last two dims are
    ``height`` x ``width`` (pixels or latents)."""
    if layout is Layout.UPPER_LOWER:
        half = height // 2
        return (slice(0, half) if panel == 0 else slice(half, height)), slice(0, width)
    half = width // 2
    return slice(0, height), (slice(0, half) if panel == 0 else slice(half, width))


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """``image`` as RGB, scaled to cover ``width`` x ``height`` and centre-cropped to it."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.BICUBIC)


@dataclass(frozen=True, eq=False)
class PanelCondition:
    """A dual-panel generation: its ``layout``, its ``task`` (which panel is the map, which is
    known) and, for image conditioning, the ``reference`` latents of the known panel
    ((1 or batch), C, panel_h / 8, panel_w / 8). ``reference=None`` generates the whole grid from
    the text alone. ``output``: ``panel`` (the generated panel) or ``grid`` (both panels)."""

    layout: Layout
    task: Task
    reference: torch.Tensor | None = None
    output: Literal["panel", "grid"] = "panel"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", parse_layout(self.layout))
        object.__setattr__(self, "task", parse_task(self.task))
        if self.output not in ("panel", "grid"):
            raise ConfigError(f"unknown output {self.output!r}; choose panel or grid")

    # ---------------------------------------------------------------- what goes where
    @property
    def generated(self) -> int:
        """The panel the model generates (0 = upper / left, 1 = lower / right)."""
        return MAP_PANEL if self.task.generates_map else IMAGE_PANEL

    @property
    def known(self) -> int:
        """The panel kept from the reference."""
        return 1 - self.generated

    @property
    def fill_ins(self) -> dict[str, str]:
        """Template C's ``panel_a`` / ``panel_kind`` / ``panel_b`` for this task and layout."""
        return panel_fill_ins(self.task.kind, self.layout.value)

    @classmethod
    def from_image(
        cls,
        image: Image.Image,
        *,
        task: Task | str,
        layout: Layout | str,
        height: int,
        width: int,
        vae: Any,
        output: Literal["panel", "grid"] = "panel",
    ) -> PanelCondition:
        """Fit ``image`` to the known panel of a ``height`` x ``width`` grid and VAE-encode it."""
        from model.vae import encode_images

        panel_h, panel_w = panel_size(layout, height, width)
        latents = encode_images(vae, [fit_image(image, panel_h, panel_w)])
        return cls(parse_layout(layout), parse_task(task), latents, output)

    # ------------------------------------------------------------------- sampling
    def check(self, latent_shape: tuple[int, ...]) -> None:
        """:class:`ConfigError` unless the grid splits in two and the reference fits the known panel."""
        batch, channels, lat_h, lat_w = latent_shape
        panel_size(self.layout, lat_h * VAE_DOWNSAMPLE, lat_w * VAE_DOWNSAMPLE)
        if self.reference is None:
            return
        rows, cols = panel_slices(self.layout, self.known, lat_h, lat_w)
        want = (channels, rows.stop - rows.start, cols.stop - cols.start)
        ref = tuple(self.reference.shape)
        if len(ref) != 4 or ref[1:] != want or ref[0] not in (1, batch):
            raise ConfigError(f"reference latents {ref} do not fit the known panel ({batch} or 1, *{want})")

    def step_hook(self, initial: torch.Tensor) -> StepHook | None:
        """The replacement applied before the first step and after every solver step: the known
        panel becomes the reference noised to time ``t`` with the known panel's part of
        ``initial`` (the generation's fixed noise draw). ``None`` without a reference."""
        if self.reference is None:
            return None
        rows, cols = panel_slices(self.layout, self.known, initial.shape[-2], initial.shape[-1])
        noise = initial[..., rows, cols].clone()
        reference = self.reference.to(noise.device, noise.dtype).expand_as(noise)

        def hook(x: torch.Tensor, t: float) -> torch.Tensor:
            x = x.clone()
            x[..., rows, cols] = interpolate(reference, noise, torch.full((x.shape[0],), t))
            return x

        return hook

    def crop(self, latents: torch.Tensor) -> torch.Tensor:
        """The generated panel of grid ``latents`` (all of it when ``output`` is ``grid``)."""
        if self.output == "grid":
            return latents
        rows, cols = panel_slices(self.layout, self.generated, latents.shape[-2], latents.shape[-1])
        return latents[..., rows, cols]


def read_image(path: str | Path) -> Image.Image:
    """Open and decode an image file; a one-line :class:`ConfigError` when it is missing or not an
    image PIL can decode (decompression bombs included: ``Image.MAX_IMAGE_PIXELS``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"condition image {path} does not exist or is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ConfigError(f"condition image {path} cannot be decoded: {first_line(exc)}") from None
