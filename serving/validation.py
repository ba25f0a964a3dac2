"""Request checking: :class:`RequestError` (a status and a one-line message), the validation-error
messages, the defaults and limits applied to a generate request, and the app's error handlers."""

from __future__ import annotations

import base64
import binascii
import io
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from common.errors import ConfigError, first_line
from model.sampler import SamplerConfig
from model.sampler.conditioning import Layout, panel_size
from model.sampler.sampler import PIXEL_MULTIPLE
from serving.schemas import GenerateRequest
from serving.settings import ServingDefaults
from serving.worker import PanelJob

INPUT_FORMATS = ("PNG", "JPEG")
_DATA_URL = re.compile(r"^data:image/[a-z+.-]+;base64,", re.IGNORECASE)


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def describe_validation(errors: list[dict]) -> tuple[int, str]:
    """(status, one-line message) for request validation errors: bad JSON is 400, the rest 422."""
    messages = []
    for err in errors:
        kind, where = err.get("type", ""), _field_name(tuple(err.get("loc", ())))
        if kind == "json_invalid":
            return 400, f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        if kind == "extra_forbidden":
            messages.append(f"unknown field {where!r}")
        elif kind == "missing":
            messages.append(f"{where}: field required")
        else:
            messages.append(f"{where}: {err.get('msg')}")
    message = "; ".join(dict.fromkeys(messages)) or "invalid request"
    return 422, _printable(message)


def _printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (lone surrogates) escaped, so it can be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_request(
    body: GenerateRequest, defaults: ServingDefaults
) -> tuple[list[str], list[str], int, int, SamplerConfig]:
    """Apply defaults and limits; :class:`RequestError` (422) with a clear message if out of range."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise RequestError(422, "prompt: at least one prompt is required")
    if len(prompts) > defaults.max_batch:
        raise RequestError(422, f"prompt: {len(prompts)} prompts exceed max_batch {defaults.max_batch}")
    for i, p in enumerate(prompts):
        where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
        if not p.strip():
            raise RequestError(422, f"{where}: prompt must not be empty")
        if len(p) > defaults.max_prompt_chars:
            raise RequestError(
                422, f"{where}: {len(p)} characters exceed max_prompt_chars {defaults.max_prompt_chars}"
            )
    negative = body.negative_prompt if body.negative_prompt is not None else ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise RequestError(
            422, f"negative_prompt: {len(negatives)} negative prompts for {len(prompts)} prompts"
        )
    if any(len(n) > defaults.max_prompt_chars for n in negatives):
        raise RequestError(422, f"negative_prompt: longer than max_prompt_chars {defaults.max_prompt_chars}")
    height = body.height if body.height is not None else defaults.height
    width = body.width if body.width is not None else defaults.width
    for name, value in (("height", height), ("width", width)):
        if value < PIXEL_MULTIPLE or value % PIXEL_MULTIPLE:
            raise RequestError(422, f"{name}: {value} must be a positive multiple of {PIXEL_MULTIPLE}")
        if value > defaults.max_side:
            raise RequestError(422, f"{name}: {value} exceeds max_side {defaults.max_side}")
    steps = body.steps if body.steps is not None else defaults.steps
    if steps > defaults.max_steps:
        raise RequestError(422, f"steps: {steps} exceeds max_steps {defaults.max_steps}")
    values = {
        "steps": steps,
        "guidance_scale": body.guidance_scale,
        "cfg_trunc": body.cfg_trunc,
        "renorm": body.renorm,
        "solver": body.solver,
        "teacache": body.teacache,
        "system_prompt": body.system_prompt,
    }
    base = defaults.sampler_config().model_dump()
    base.update({k: v for k, v in values.items() if v is not None})
    try:
        config = SamplerConfig(**base)
    except ValidationError as exc:
        raise RequestError(422, describe_validation(exc.errors())[1]) from exc
    return prompts, negatives, height, width, config


def check_panels(
    body: GenerateRequest, defaults: ServingDefaults, height: int, width: int, config: SamplerConfig
) -> tuple[PanelJob | None, SamplerConfig]:
    """The dual-panel part of a request (``task``, ``layout``, ``input_image``) and its sampler
    settings (Template C unless the request names a system prompt). 422 for a grid that does not
    split into two panels or a bad image, 413 for an image over the limits. Decodes the image:
    call it off the event loop."""
    if body.task is None:
        for name in ("input_image", "layout"):
            if getattr(body, name) is not None:
                raise RequestError(422, f"{name}: needs a task (depth, canny, sketch, mask, image-from-...)")
        return None, config
    layout = body.layout or Layout.UPPER_LOWER
    try:
        panel_size(layout, height, width)
    except ConfigError as exc:
        raise RequestError(422, f"height/width: {exc}") from None
    image = decode_input_image(body.input_image, defaults) if body.input_image is not None else None
    if body.system_prompt is None:
        config = config.model_copy(update={"system_prompt": "C"})
    return PanelJob(task=body.task, layout=layout, image=image), config


def decode_input_image(data: str, defaults: ServingDefaults) -> Image.Image:
    """Base64 PNG / JPEG → RGB image. 422: not base64, not a PNG or JPEG, broken; 413: more than
    ``max_input_image_bytes`` decoded, or more than ``max_input_pixels`` (read from the header,
    before decoding: a decompression bomb is refused unread; PIL's ``Image.MAX_IMAGE_PIXELS``
    check stays on as well)."""
    text = "".join(_DATA_URL.sub("", data.strip(), count=1).split())
    limit = defaults.max_input_image_bytes
    if len(text) // 4 * 3 > limit + 2:  # before decoding: base64 is 4 characters per 3 bytes
        raise RequestError(
            413, f"input_image: about {len(text) // 4 * 3} bytes exceed max_input_image_bytes {limit}"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(422, f"input_image: not valid base64 ({first_line(exc)})") from None
    if not raw:
        raise RequestError(422, "input_image: empty")
    if len(raw) > limit:
        raise RequestError(413, f"input_image: {len(raw)} bytes exceed max_input_image_bytes {limit}")
    try:
        image = Image.open(io.BytesIO(raw), formats=INPUT_FORMATS)
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"input_image: {first_line(exc)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(422, "input_image: not a PNG or JPEG image") from None
    with image:
        pixels = image.width * image.height
        if pixels > defaults.max_input_pixels:
            raise RequestError(
                413,
                f"input_image: {image.width}x{image.height} = {pixels} pixels exceed max_input_pixels "
                f"{defaults.max_input_pixels}",
            )
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
            raise RequestError(
                422, f"input_image: cannot decode the {image.format}: {first_line(exc)}"
            ) from None


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, message = describe_validation(list(exc.errors()))
    return JSONResponse({"detail": message}, status_code=status)


async def request_error_handler(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)
