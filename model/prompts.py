"""System prompt templates of Lumina-Image 2.0 (paper Sec. 3, multi-domain system prompts).

The template text is prepended to the caption. Names follow the official code
(Alpha-VLLM/Lumina-Image-2.0): its sampler's ``--system_type real`` (the default of ``sample.py``,
``demo.py`` and diffusers' ``Lumina2Pipeline``) is our Template B, its ``base`` our Template A.
So inference defaults to B, and training uses B for real images and A for synthetic ones
(``components.train.config.TrainConfig.system_prompts``). Template C describes multi-panel grids.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from common.errors import ConfigError

PROMPT_START = "<Prompt Start> "


class SystemPrompt(StrEnum):
    """Names of the system prompt templates."""

    A = "A"
    B = "B"
    C = "C"
    NONE = "none"


TEMPLATES: dict[SystemPrompt, str] = {
    SystemPrompt.A: ("You are an assistant designed to generate high-quality images based on user prompts. "),
    SystemPrompt.B: (
        "You are an assistant designed to generate superior images with the superior degree of "
        "image-text alignment based on textual prompts or user prompts. "
    ),
    SystemPrompt.C: (
        "Generate a dual-panel image where the {panel_a} displays a {panel_kind}, while the "
        "{panel_b} retains the original image for direct visual comparison. "
    ),
}


# Training template per image domain, in the official naming: real images get its "real" type
# (Template B), synthetic ones "base" (Template A). Unknown domains are treated as real.
DOMAIN_TEMPLATES: dict[str, SystemPrompt] = {"real": SystemPrompt.B, "synthetic": SystemPrompt.A}


def domain_template(domain: str, templates: dict[str, SystemPrompt] | None = None) -> SystemPrompt:
    """The system prompt template for an image ``domain`` (``templates`` overrides the defaults)."""
    table = DOMAIN_TEMPLATES if templates is None else templates
    return table.get(domain, DOMAIN_TEMPLATES["real"])


def parse_system_prompt(name: str | SystemPrompt) -> SystemPrompt:
    """Parse a template name (``A``/``B``/``C``/``none``, case-insensitive)."""
    try:
        return SystemPrompt(str(name).upper() if str(name).lower() != "none" else "none")
    except ValueError:
        choices = ", ".join(t.value for t in SystemPrompt)
        raise ConfigError(f"unknown system prompt template {name!r}; choose one of: {choices}") from None


def apply_system_prompt(
    caption: str,
    template: str | SystemPrompt = SystemPrompt.B,
    *,
    panel_a: str = "lower half",
    panel_kind: str = "depth map",
    panel_b: str = "upper half",
) -> str:
    """Prepend the system prompt ``template`` to ``caption``.

    The sampler applies it to a non-empty negative prompt too, as the official ``sample.py`` does
    (an empty negative prompt stays empty).
    """
    kind = parse_system_prompt(template)
    if kind is SystemPrompt.NONE:
        return caption
    prefix = TEMPLATES[kind]
    if kind is SystemPrompt.C:
        prefix = prefix.format(panel_a=panel_a, panel_kind=panel_kind, panel_b=panel_b)
    return f"{prefix}{PROMPT_START}{caption}"


# Template C fill-ins per map kind and dual-panel layout: the map is the lower / right panel, the
# original image the upper / left one (the generated panel is the map for "depth", the image for
# "image-from-depth"; the wording is the same, only which panel is known changes).
PANEL_KINDS: dict[str, str] = {
    "depth": "depth map",
    "canny": "canny edge map",
    "sketch": "sketch",
    "mask": "segmentation mask",
}  # the same words as the grid builder's (components.grids.grid.KIND_NAMES, English)
PANEL_NAMES: dict[str, tuple[str, str]] = {
    "upper-lower": ("upper half", "lower half"),
    "left-right": ("left half", "right half"),
}


def panel_fill_ins(kind: str, layout: str = "upper-lower") -> dict[str, str]:
    """Template C's ``panel_a`` (the map panel), ``panel_kind`` and ``panel_b`` (the image panel)
    for a map ``kind`` (depth / canny / sketch / mask, or its ``image-from-`` reverse) and a ``layout``."""
    kind = kind.lower().removeprefix("image-from-")
    if kind not in PANEL_KINDS:
        raise ConfigError(f"unknown panel kind {kind!r}; choose one of: {', '.join(PANEL_KINDS)}")
    if layout not in PANEL_NAMES:
        raise ConfigError(f"unknown layout {layout!r}; choose one of: {', '.join(PANEL_NAMES)}")
    image_panel, map_panel = PANEL_NAMES[layout]
    return {"panel_a": map_panel, "panel_kind": PANEL_KINDS[kind], "panel_b": image_panel}


def panel_prompt(caption: str, kind: str, layout: str = "upper-lower") -> str:
    """``caption`` with Template C filled in for a dual-panel ``kind`` / ``layout`` grid."""
    return apply_system_prompt(caption, SystemPrompt.C, **panel_fill_ins(kind, layout))


# Template C for multi-image grids (paper Sec. 3: "Generate a dual-panel image where the {lower half}
# displays a {depth map}, while the {upper half} retains the original image for direct visual
# comparison."). The paper gives only the English dual-panel wording; the 2x2 wording follows it
# (the official sampler's "4grid" type names the 2x2 arrangement the same way), and the Chinese text
# is its translation, used for Chinese captions. A grid row stores its fill-ins per language
# (``grid_fill``, written by :mod:`components.grids.grid`); :func:`apply_grid_prompt` applies them.
GRID_DOMAIN = "grid"
"""The image domain of grid samples; their captions get Template C with the row's fill-ins."""

GRID_PANELS = ("dual", "2x2")
"""The grid templates: two panels (image + one map) or a 2x2 grid (image + three maps)."""

GRID_TEMPLATES: dict[str, dict[str, str]] = {
    "dual": {
        "en": TEMPLATES[SystemPrompt.C],
        "zh": (
            "生成一幅双联图像，其中{panel_a}显示{panel_kind}，"
            "而{panel_b}保留原始图像，以便直接进行视觉对比。 "
        ),
    },
    "2x2": {
        "en": (
            "Generate a four-panel image arranged in a 2x2 grid where {panel_maps}, while the {panel_b} "
            "retains the original image for direct visual comparison. "
        ),
        "zh": (
            "生成一幅按2×2网格排列的四联图像，其中{panel_maps}，"
            "而{panel_b}保留原始图像，以便直接进行视觉对比。 "
        ),
    },
}
"""Template C text by grid kind and caption language. ``dual`` fill-ins: ``panel_a`` (where the map
is), ``panel_kind`` (the map's name), ``panel_b`` (where the original image is); ``2x2`` fill-ins:
``panel_maps`` (each map panel and what it displays, one clause) and ``panel_b``."""


def grid_system_prompt(fill: dict[str, str], language: str = "en") -> str:
    """The Template C prefix of a grid for a caption in ``language`` (English wording for a language
    without a translation). ``fill``: the fill-ins of that language plus ``panels`` (``dual`` |
    ``2x2``; ``dual`` when absent); :class:`ConfigError` when one is missing."""
    panels = fill.get("panels", "dual")
    if panels not in GRID_TEMPLATES:
        raise ConfigError(f"unknown grid panels {panels!r}; choose one of: {', '.join(GRID_PANELS)}")
    texts = GRID_TEMPLATES[panels]
    try:
        return texts.get(language, texts["en"]).format(**fill)
    except KeyError as exc:
        raise ConfigError(f"grid prompt ({panels}) lacks the fill-in {exc.args[0]!r}") from None


def apply_grid_prompt(caption: str, fill: dict[str, str], language: str = "en") -> str:
    """Prepend the grid's Template C (:func:`grid_system_prompt`) to ``caption``."""
    return f"{grid_system_prompt(fill, language)}{PROMPT_START}{caption}"


def apply_grid_fills(caption: str, fills: Mapping[str, dict[str, str]], language: str = "en") -> str:
    """:func:`apply_grid_prompt` with a grid row's fill-ins per language (``{"en": {...}, "zh":
    {...}}``): the caption's own language's, else the English ones."""
    return apply_grid_prompt(caption, fills.get(language, fills["en"]), language)
