"""System prompt templates of Lumina-Image 2.0 (paper Sec. 3, multi-domain system prompts).

The template text is prepended to the caption. Names follow the official code
(Alpha-VLLM/Lumina-Image-2.0): its sampler's ``--system_type real`` (the default of ``sample.py``,
``demo.py`` and diffusers' ``Lumina2Pipeline``) is our Template B, its ``base`` our Template A.
So inference defaults to B, and training uses B for real images and A for synthetic ones
(``components.train.config.TrainConfig.system_prompts``). Template C describes multi-panel grids.
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
