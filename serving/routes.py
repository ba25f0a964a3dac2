"""The HTTP routes: the try-it page, ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/model`` and
``POST /v1/generate``. Each route finds the app's :class:`~serving.runtime.Runtime` in
``app.state.runtime``."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import secrets
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from common.errors import ConfigError, LuminaError
from model.sampler import LuminaSampler
from model.sampler.sampler import check_size
from serving.metrics import CONTENT_TYPE
from serving.page import INDEX_HTML
from serving.runtime import Runtime
from serving.schemas import GenerateRequest, GenerateResponse
from serving.validation import RequestError, check_panels, check_request
from serving.worker import GenerationWorker, Job, QueueFullError, ShuttingDownError

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False)


# ------------------------------------------------------------------------------ dependencies
async def runtime_of(request: Request) -> Runtime:
    """The app's runtime (async: it runs on the event loop, never waits for a worker thread)."""
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


def authorize(
    runtime: RuntimeDep,
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


def ready_sampler(runtime: Runtime) -> tuple[LuminaSampler, GenerationWorker]:
    if runtime.error is not None:
        raise RequestError(503, f"model failed to load: {runtime.error}")
    if not runtime.ready.is_set() or runtime.sampler is None or runtime.worker is None:
        raise RequestError(503, "model is loading, retry later", headers={"Retry-After": "5"})
    return runtime.sampler, runtime.worker


# ------------------------------------------------------------------------------------- ops
def index() -> str:
    return INDEX_HTML


async def healthz(runtime: RuntimeDep) -> JSONResponse:
    """Liveness: 200 while the event loop answers and the generation worker thread is alive and
    not stuck (heartbeat while idle; one sampler call at most ``liveness_timeout_s``), else
    503. While the model loads it is 200 (``/readyz`` says when it is ready)."""
    problem = runtime.liveness_problem()
    if problem is not None:
        return JSONResponse({"status": "unhealthy", "error": problem}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(runtime: RuntimeDep) -> JSONResponse:
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


def prometheus(runtime: RuntimeDep) -> Response:
    """Prometheus text exposition."""
    if runtime.worker is not None:
        runtime.metrics.queue_depth.set(runtime.worker.depth)
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


# -------------------------------------------------------------------------------------- v1
def model(runtime: RuntimeDep) -> dict:
    """The loaded model: source, local folder, profile, parameter counts, defaults and limits."""
    ready_sampler(runtime)
    defaults = runtime.defaults
    return {
        **runtime.info,
        "defaults": defaults.model_dump(mode="json"),
        "queue": {"depth": runtime.worker.depth if runtime.worker else 0, "size": defaults.queue_size},
    }


async def generate(body: GenerateRequest, request: Request, runtime: RuntimeDep) -> Response:
    """Generate one image per prompt; with ``task`` a dual-panel grid of height x width, and with
    ``input_image`` as well its generated panel, the other panel kept to the image."""
    start = time.perf_counter()
    prompts, negatives, height, width, config = check_request(body, runtime.defaults)
    sampler, worker = ready_sampler(runtime)
    try:
        check_size(height, width, sampler.transformer)
    except ConfigError as exc:
        raise RequestError(400, str(exc)) from exc
    panels, config = (
        await run_in_threadpool(check_panels, body, runtime.defaults, height, width, config)
        if body.task is not None or body.input_image is not None or body.layout is not None
        else (None, config)
    )
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    job = Job(prompts, negatives, seed, height, width, config, panels=panels)
    future = submit(runtime, worker, job)
    result = await wait_for_result(future, request, runtime.defaults.request_timeout_s)
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


GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "PNG (one image, png format) or JSON"},
    400: {"description": "invalid JSON or settings the model cannot run"},
    401: {"description": "missing or wrong bearer token"},
    413: {
        "description": "body over max_body_bytes; input_image over max_input_image_bytes / max_input_pixels"
    },
    422: {"description": "a field is out of range or unknown; input_image not base64 / not a PNG or JPEG"},
    429: {"description": "queue full; retry after Retry-After seconds"},
    503: {"description": "model not loaded yet, or shutting down"},
    504: {"description": "not finished within request_timeout_s"},
}


def add_routes(app: FastAPI) -> None:
    """Add the routes to ``app`` (on the app itself, not an included router: the metrics
    middleware labels 404 / 405 answers by the paths in ``app.routes``)."""
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["ops"])
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=["ops"])
    app.add_api_route("/metrics", prometheus, methods=["GET"], tags=["ops"], response_class=PlainTextResponse)
    authorized = [Depends(authorize)]
    app.add_api_route("/v1/model", model, methods=["GET"], tags=["v1"], dependencies=authorized)
    app.add_api_route(
        "/v1/generate", generate, methods=["POST"], tags=["v1"], dependencies=authorized,
        response_model=GenerateResponse, responses=GENERATE_RESPONSES,
    )  # fmt: skip


# ------------------------------------------------------------------------- generate helpers
def submit(runtime: Runtime, worker: GenerationWorker, job: Job):
    """Queue ``job``; a full queue is a 429 with a ``Retry-After`` estimate, shutdown a 503."""
    try:
        return worker.submit(job)
    except QueueFullError as exc:
        # about the time to work through the queue, from the mean sampler call so far
        per_call = runtime.metrics.generate_seconds.mean() or 1.0
        retry = math.ceil(per_call * (worker.depth / worker.max_rows + 1))
        raise RequestError(429, str(exc), headers={"Retry-After": str(min(max(retry, 1), 60))}) from exc
    except ShuttingDownError as exc:
        raise RequestError(503, str(exc), headers={"Retry-After": "5"}) from exc


async def wait_for_result(future, request: Request, timeout_s: float):
    """Wait for the job, the client going away or the timeout; the last two cancel the job: it
    leaves the queue unrun (a sampler call already running cannot be interrupted)."""
    waiting = asyncio.ensure_future(asyncio.wrap_future(future))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({waiting, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():
            waiting.cancel()
            future.cancel()
    if waiting not in done:
        if gone in done:
            log.info("client disconnected; its request is dropped")
            raise RequestError(499, "client closed the request")
        raise RequestError(504, f"generation did not finish within {timeout_s:g} s")
    try:
        return waiting.result()
    except ShuttingDownError as exc:
        raise RequestError(503, str(exc), headers={"Retry-After": "5"}) from exc
    except LuminaError as exc:
        raise RequestError(400, str(exc)) from exc
    except Exception as exc:
        log.exception("generation failed")
        raise RequestError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body is read already: the next message the
    server has for this request is ``http.disconnect``)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive that fails has no client left either
        return


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
