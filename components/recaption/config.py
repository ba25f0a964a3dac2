"""The recaption step's configuration (YAML, ``python -m components.recaption --config FILE``).

Which UniCap perspectives the ``vlm`` backend asks for (``perspectives``: default all six; ``[]`` turns
the second prompt off for slow captioners) and the captioner's input size: ``max_pixels`` unset means
native resolution up to the checkpoint processor's own budget (12845056 px for the released Qwen2-VL
models), a number caps it. Unknown keys are an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.config_files import read_yaml_mapping
from common.errors import ConfigError, validation_message
from components.recaption.schema import LANGUAGES, PERSPECTIVES

BACKENDS = ("auto", "metadata", "alt-text", "vlm")


class RecaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field("auto", description="auto | metadata | alt-text | vlm")
    vlm_model: str = Field("", description="Qwen2-VL-family hub id or local folder ('' = no captioner)")
    perspectives: list[str] = Field(
        default_factory=lambda: list(PERSPECTIVES),
        description=f"UniCap perspectives the vlm backend asks for, from {', '.join(PERSPECTIVES)}",
    )
    languages: list[str] = Field(default_factory=lambda: list(LANGUAGES))
    max_pixels: int | None = Field(
        None, ge=784, description="vlm input pixel cap (unset: the processor's own budget, native resolution)"
    )
    min_pixels: int | None = Field(None, ge=784, description="unset: the processor's own")
    batch_size: int = Field(4, ge=1, description="prompts per generate call")
    max_new_tokens: int = Field(512, ge=1)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown caption backend {value!r}; choose one of {', '.join(BACKENDS)}")
        return value

    @field_validator("perspectives")
    @classmethod
    def _known_perspectives(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in PERSPECTIVES]
        if unknown:
            raise ValueError(f"unknown perspectives {unknown}; choose from {', '.join(PERSPECTIVES)}")
        return [p for p in PERSPECTIVES if p in value]  # canonical order, no duplicates

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        if not value or any(lang not in LANGUAGES for lang in value):
            raise ValueError(f"languages must be a non-empty subset of {', '.join(LANGUAGES)}")
        return value

    def captioner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`components.recaption.vlm.VlmCaptioner` (unset pixel limits are
        left to the processor)."""
        kwargs: dict[str, Any] = {
            "perspectives": tuple(self.perspectives),
            "languages": tuple(self.languages),
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.max_pixels is not None:
            kwargs["max_pixels"] = self.max_pixels
        if self.min_pixels is not None:
            kwargs["min_pixels"] = self.min_pixels
        return kwargs


def parse_perspectives(text: str) -> list[str]:
    """A command-line list: ``all``, ``none`` or comma-separated names."""
    text = text.strip().lower()
    if text == "all":
        return list(PERSPECTIVES)
    if text in ("none", ""):
        return []
    return [p.strip() for p in text.split(",") if p.strip()]


def recaption_config(path: str | Path | None = None, **overrides: Any) -> RecaptionConfig:
    """The defaults, then the YAML file (if any), then ``overrides`` (``None`` values are ignored)."""
    values = read_yaml_mapping(path, "recaption config") if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RecaptionConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"recaption config: {validation_message(exc, 'config')}") from None
