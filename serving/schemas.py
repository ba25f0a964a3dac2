"""Request and response bodies of ``POST /v1/generate``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from model.sampler import Solver
from model.sampler.conditioning import Layout, Task
from model.sampler.sampler import PIXEL_MULTIPLE

MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``. Fields left out take the server's defaults."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "a red cat on the left of a blue car", "height": 512, "width": 512}]
        },
    )

    # strict: no coercion (``true`` is not 1, ``2.0`` is not an int, ``"3"`` is not a number; an int
    # is fine for a float); floats must be finite (Python's JSON parser accepts NaN / Infinity)
    prompt: StrictStr | list[StrictStr] = Field(
        description="one prompt, or a list for a batch (one image each)"
    )
    negative_prompt: StrictStr | list[StrictStr] | None = Field(
        None, description="one negative prompt for all, or one per prompt"
    )
    height: int | None = Field(None, strict=True, description=f"pixels, a multiple of {PIXEL_MULTIPLE}")
    width: int | None = Field(None, strict=True, description=f"pixels, a multiple of {PIXEL_MULTIPLE}")
    steps: int | None = Field(None, ge=1, strict=True)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, strict=True, allow_inf_nan=False)
    cfg_trunc: float | None = Field(None, ge=0.0, le=1.0, strict=True, allow_inf_nan=False)
    renorm: float | None = Field(None, ge=0.0, strict=True, allow_inf_nan=False)
    solver: Solver | None = None
    teacache: float | None = Field(None, ge=0.0, strict=True, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True, description="random when left out")
    system_prompt: Literal["A", "B", "C"] | None = None
    task: Task | None = Field(
        None,
        description="a dual-panel Template C grid of height x width: depth / canny / sketch / mask generate "
        "the map of input_image, image-from-* the image of the map in input_image; without "
        "input_image the whole grid is generated from the text",
    )
    layout: Layout | None = Field(
        None, description="upper-lower (default) or left-right; the image is the upper / left panel"
    )
    input_image: StrictStr | None = Field(
        None,
        description="base64 PNG or JPEG (a data: URL is fine): the known panel, fitted to the panel "
        "size (with task); the answer is the generated panel",
    )
    response_format: Literal["png", "b64_json"] = Field(
        "png", description="png: an image/png body for a single image; b64_json (or several images): JSON"
    )

    @field_validator("prompt", "negative_prompt", "system_prompt", mode="before")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        """Text must encode as UTF-8: JSON can carry a lone UTF-16 surrogate (``"\\ud800"``) that
        the tokenizer cannot take."""
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for i, text in enumerate(texts):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    where = "" if isinstance(value, str) else f"item {i}: "
                    raise ValueError(
                        f"{where}not valid Unicode text (lone UTF-16 surrogate at character {exc.start})"
                    ) from None
        return value


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNGs, one per prompt")
    seed: int
    timings: dict[str, float]
    forward_calls: int = Field(description="transformer calls of the sampler call that made these images")
    batch: dict[str, int] = Field(description="requests and images in that sampler call")
