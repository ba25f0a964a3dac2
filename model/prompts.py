"""System prompt templates of Lumina-Image 2.0 (paper Sec. 3, multi-domain system prompts).

Template A is used for real images, Template B for synthetic / alignment-heavy data and
Template C for multi-panel (e.g. depth-map) grids. The template text is prepended to the caption.
"""

from __future__ import annotations

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


def parse_system_prompt(name: str | SystemPrompt) -> SystemPrompt:
    """Parse a template name (``A``/``B``/``C``/``none``, case-insensitive)."""
    try:
        return SystemPrompt(str(name).upper() if str(name).lower() != "none" else "none")
    except ValueError:
        choices = ", ".join(t.value for t in SystemPrompt)
        raise ConfigError(f"unknown system prompt template {name!r}; choose one of: {choices}") from None


def apply_system_prompt(
    caption: str,
    template: str | SystemPrompt = SystemPrompt.A,
    *,
    panel_a: str = "lower half",
    panel_kind: str = "depth map",
    panel_b: str = "upper half",
) -> str:
    """Prepend the system prompt ``template`` to ``caption``.

    As in the official sampler and diffusers, the negative / unconditional prompt of CFG is used
    without a template (the sampler does not call this for it).
    """
    kind = parse_system_prompt(template)
    if kind is SystemPrompt.NONE:
        return caption
    prefix = TEMPLATES[kind]
    if kind is SystemPrompt.C:
        prefix = prefix.format(panel_a=panel_a, panel_kind=panel_kind, panel_b=panel_b)
    return f"{prefix}{PROMPT_START}{caption}"
