"""The FastAPI app: health, readiness, model info, metrics, a try-it page and ``POST /v1/generate``.

The model loads in a background thread at startup (``/healthz`` answers at once, ``/readyz`` is
503 until the sampler is ready); generation requests go through a bounded queue to one worker
thread that micro-batches compatible requests (see :mod:`serving.worker`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from common.errors import ConfigError, LuminaError
from model.sampler import LuminaSampler, SamplerConfig, Solver
from model.sampler.sampler import PIXEL_MULTIPLE, check_size
from serving.fetch import resolve_source
from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.page import INDEX_HTML
from serving.settings import ServerSettings, ServingDefaults, load_defaults
from serving.worker import GenerationWorker, Job, QueueFullError, ShuttingDownError

log = logging.getLogger(__name__)

SamplerFactory = Callable[[Path], LuminaSampler]
_bearer = HTTPBearer(auto_error=False)
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


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ---------------------------------------------------------------------------------- runtime
class Runtime:
    """What the app holds: settings, metrics, the loaded sampler and its worker."""

    def __init__(
        self,
        settings: ServerSettings,
        defaults: ServingDefaults,
        sampler_factory: SamplerFactory | None,
        on_load_error: Callable[[BaseException], None] | None,
    ):
        self.settings = settings
        self.defaults = defaults
        self.metrics = ServerMetrics()
        self.token = settings.token()
        self.device = settings.resolved_device()
        self.sampler_factory = sampler_factory or (
            lambda folder: LuminaSampler.load(folder, device=self.device)
        )
        self.on_load_error = on_load_error
        self.ready = threading.Event()
        self.sampler: LuminaSampler | None = None
        self.worker: GenerationWorker | None = None
        self.folder: Path | None = None
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self._loader: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="lumina-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        start = time.perf_counter()
        source = self.settings.model_source or ""
        try:
            folder = resolve_source(source, self.settings.model_dir)
            sampler = self.sampler_factory(folder)
        except Exception as exc:
            self.error = str(exc) if isinstance(exc, LuminaError) else f"{type(exc).__name__}: {exc}"
            log.error("model load failed: %s", self.error)
            if self.on_load_error is not None:
                self.on_load_error(exc)
            return
        if self._stopping:
            return
        self.folder, self.sampler = folder, sampler
        self.info = model_info(sampler, source, folder, self.device, time.perf_counter() - start)
        d = self.defaults
        self.worker = GenerationWorker(
            sampler,
            queue_size=d.queue_size,
            max_rows=d.merge_rows or d.max_batch,
            batch_window_s=d.batch_window_ms / 1000.0,
            micro_batch=d.micro_batch,
            on_depth=self.metrics.queue_depth.set,
            on_call=self._record_call,
            heartbeat_s=min(1.0, d.liveness_timeout_s / 4),  # idle beats well inside the bound
        )
        self.worker.start()
        self.metrics.ready.set(1)
        self.ready.set()
        log.info("model ready: %s (%s) in %.1f s", source, folder, self.info["load_seconds"])

    def liveness_problem(self) -> str | None:
        """Why the server is not live: the worker thread died or is stuck (``None``: it is live;
        also while the model loads or after a failed load, which ``/readyz`` reports)."""
        worker = self.worker
        if worker is None or self._stopping:
            return None
        return worker.problem(self.defaults.liveness_timeout_s)

    def _record_call(self, requests: int, rows: int, seconds: float) -> None:
        self.metrics.batches.inc()
        self.metrics.batch_requests.observe(requests)
        self.metrics.generate_seconds.observe(seconds)
        self.metrics.images.inc(rows)

    def stop(self) -> None:
        self._stopping = True
        self.ready.clear()
        self.metrics.ready.set(0)
        if self.worker is not None:
            cancelled = self.worker.stop()
            if cancelled:
                log.info("shutdown: cancelled %d queued requests", cancelled)


def _count(module: Any) -> int:
    try:
        return sum(p.numel() for p in module.parameters())
    except AttributeError:
        return 0


def model_info(sampler: LuminaSampler, source: str, folder: Path, device: str, seconds: float) -> dict:
    from model.profiles import PROFILES

    cfg = sampler.transformer.config
    profile = next(
        (
            name
            for name, p in PROFILES.items()
            if (p.transformer.hidden_size, p.transformer.num_layers, p.transformer.num_attention_heads)
            == (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads)
        ),
        "custom",
    )
    return {
        "source": source,
        "folder": str(folder),
        "profile": profile,
        "transformer_params": _count(sampler.transformer),
        "text_encoder_params": _count(getattr(sampler, "text_encoder", None)),
        "vae_params": _count(getattr(sampler, "vae", None)),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(seconds, 3),
    }


# ------------------------------------------------------------------------------- validation
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


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------- middleware
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
PROTECTED_PREFIX = "/v1/"


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a request body passes ``max_body_bytes``."""


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """Pure ASGI middleware (nothing buffered) that runs before the app reads a request body.

    - ``/v1/*`` with a token set: the bearer token is checked first; a wrong or missing one is a
      401 and the body is never read.
    - A ``Content-Length`` above ``max_body_bytes`` is a 413 before anything is read; a body that
      passes the limit while it streams in (chunked, or a lying length) is a 413 as soon as it does,
      the rest is not read (the connection is closed).
    """

    def __init__(self, app, *, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token is not None and scope.get("path", "").startswith(PROTECTED_PREFIX):
            scheme, _, given = (_header(scope, b"authorization") or "").partition(" ")
            given = given.strip() if scheme.lower() == "bearer" else ""
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                detail = (
                    "missing or invalid bearer token" if given else "authorization required: Bearer token"
                )
                return await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
        too_large = f"request body larger than max_body_bytes {self.max_body_bytes}"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            return await _send_json(send, 413, too_large, [(b"connection", b"close")])
        received, exceeded, started = 0, False, False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise BodyTooLarge(too_large)
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to the aborted read; the 413 below replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _send_json(send, 413, too_large, [(b"connection", b"close")])


class MetricsMiddleware:
    """Request latency and error counts. Labels are bounded: the method is one of
    :data:`KNOWN_METHODS` or ``other``, the path a route of the app or ``other``."""

    def __init__(self, app, *, metrics: ServerMetrics, routes: list):
        self.app, self.metrics, self.routes = app, metrics, routes
        self._paths: frozenset[str] | None = None

    def _path_label(self, scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path:
            return path
        if self._paths is None:  # routes are all added by the first request
            self._paths = frozenset(p for r in self.routes if (p := getattr(r, "path", None)))
        return scope.get("path") if scope.get("path") in self._paths else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope.get("method", "")
            code = str(status[0])
            self.metrics.request_latency.observe(
                time.perf_counter() - start,
                path=self._path_label(scope),
                method=method if method in KNOWN_METHODS else "other",
                status=code,
            )
            if status[0] >= 400:
                self.metrics.errors.inc(status=code)


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body is read already: the next message the
    server has for this request is ``http.disconnect``)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive that fails has no client left either
        return


# -------------------------------------------------------------------------------------- app
def create_app(
    settings: ServerSettings | None = None,
    *,
    defaults: ServingDefaults | None = None,
    sampler_factory: SamplerFactory | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. ``sampler_factory(folder)`` loads the sampler (default
    :meth:`LuminaSampler.load`); ``on_load_error`` is called if loading fails (the CLI exits)."""
    settings = settings or ServerSettings()
    defaults = defaults or load_defaults(settings.defaults_file)
    runtime = Runtime(settings, defaults, sampler_factory, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)

    app = FastAPIOffline(  # /docs and /redoc from the package's own Swagger UI / ReDoc files, no CDN
        title="Lumina-Image 2.0 sampler",
        version="0.1.0",
        description="Text-to-image generation with the Lumina-Image 2.0 sampler.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    metrics = runtime.metrics

    # ------------------------------------------------------------------ middleware & errors
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = describe_validation(list(exc.errors()))
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    app.add_middleware(RequestGuard, token=runtime.token, max_body_bytes=defaults.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.routes)

    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if runtime.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), runtime.token.encode()):
            raise RequestError(
                401,
                "missing or invalid bearer token" if given else "authorization required: Bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def ready_sampler() -> tuple[LuminaSampler, GenerationWorker]:
        if runtime.error is not None:
            raise RequestError(503, f"model failed to load: {runtime.error}")
        if not runtime.ready.is_set() or runtime.sampler is None or runtime.worker is None:
            raise RequestError(503, "model is loading, retry later", headers={"Retry-After": "5"})
        return runtime.sampler, runtime.worker

    # --------------------------------------------------------------------------- routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return INDEX_HTML

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """Liveness: 200 while the event loop answers and the generation worker thread is alive and
        not stuck (heartbeat while idle; one sampler call at most ``liveness_timeout_s``), else
        503. While the model loads it is 200 (``/readyz`` says when it is ready)."""
        problem = runtime.liveness_problem()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "error": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Readiness: 503 until the model is loaded (or after a failed load, or while the worker is
        not live), then 200."""
        if runtime.ready.is_set():
            problem = runtime.liveness_problem()
            if problem is not None:
                return JSONResponse({"status": "unhealthy", "error": problem}, status_code=503)
            return JSONResponse({"status": "ready"})
        if runtime.error is not None:
            return JSONResponse({"status": "failed", "error": runtime.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> Response:
        """Prometheus text exposition."""
        if runtime.worker is not None:
            metrics.queue_depth.set(runtime.worker.depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/model", tags=["v1"], dependencies=[Depends(authorize)])
    def model() -> dict:
        """The loaded model: source, local folder, profile, parameter counts, defaults and limits."""
        ready_sampler()
        return {
            **runtime.info,
            "defaults": defaults.model_dump(mode="json"),
            "queue": {"depth": runtime.worker.depth if runtime.worker else 0, "size": defaults.queue_size},
        }

    @app.post(
        "/v1/generate",
        tags=["v1"],
        dependencies=[Depends(authorize)],
        response_model=GenerateResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": "PNG (one image, png format) or JSON"},
            400: {"description": "invalid JSON or settings the model cannot run"},
            401: {"description": "missing or wrong bearer token"},
            413: {"description": "body larger than max_body_bytes"},
            422: {"description": "a field is out of range or unknown"},
            429: {"description": "queue full; retry after Retry-After seconds"},
            503: {"description": "model not loaded yet, or shutting down"},
            504: {"description": "not finished within request_timeout_s"},
        },
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate one image per prompt."""
        start = time.perf_counter()
        prompts, negatives, height, width, config = check_request(body, defaults)
        sampler, worker = ready_sampler()
        try:
            check_size(height, width, sampler.transformer)
        except ConfigError as exc:
            raise RequestError(400, str(exc)) from exc
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        job = Job(prompts, negatives, seed, height, width, config)
        try:
            future = worker.submit(job)
        except QueueFullError as exc:
            # about the time to work through the queue, from the mean sampler call so far
            per_call = metrics.generate_seconds.mean() or 1.0
            retry = math.ceil(per_call * (worker.depth / worker.max_rows + 1))
            raise RequestError(429, str(exc), headers={"Retry-After": str(min(max(retry, 1), 60))}) from exc
        except ShuttingDownError as exc:
            raise RequestError(503, str(exc), headers={"Retry-After": "5"}) from exc
        # wait for the job, the client going away or the timeout; the last two cancel the job: it
        # leaves the queue unrun (a sampler call already running cannot be interrupted)
        waiting = asyncio.ensure_future(asyncio.wrap_future(future))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait(
                {waiting, gone}, timeout=defaults.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
                future.cancel()
        if waiting not in done:
            if gone in done:
                log.info("client disconnected; its request is dropped")
                raise RequestError(499, "client closed the request")
            raise RequestError(504, f"generation did not finish within {defaults.request_timeout_s:g} s")
        try:
            result = waiting.result()
        except ShuttingDownError as exc:
            raise RequestError(503, str(exc), headers={"Retry-After": "5"}) from exc
        except LuminaError as exc:
            raise RequestError(400, str(exc)) from exc
        except Exception as exc:
            log.exception("generation failed")
            raise RequestError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc
        encode_start = time.perf_counter()
        pngs = await run_in_threadpool(lambda: [_png_bytes(im) for im in result.images])
        timings = {
            "queue_s": round(result.queue_s, 4),
            "generate_s": round(result.generate_s, 4),
            "encode_s": round(time.perf_counter() - encode_start, 4),
            "total_s": round(time.perf_counter() - start, 4),
        }
        if body.response_format == "png" and len(pngs) == 1:
            headers = {
                "X-Seed": str(seed),
                "X-Forward-Calls": str(result.forward_calls),
                "X-Generate-Seconds": str(timings["generate_s"]),
            }
            return Response(pngs[0], media_type="image/png", headers=headers)
        payload = GenerateResponse(
            images=[base64.b64encode(p).decode("ascii") for p in pngs],
            seed=seed,
            timings=timings,
            forward_calls=result.forward_calls,
            batch={"requests": result.merged_requests, "images": result.merged_rows},
        )
        return JSONResponse(payload.model_dump())

    return app
