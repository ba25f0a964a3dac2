"""The FastAPI app: health, readiness, model info, metrics, a try-it page and ``POST /v1/generate``.

The model loads in a background thread at startup (``/healthz`` answers at once, ``/readyz`` is
503 until the sampler is ready); generation requests go through a bounded queue to one worker
thread that micro-batches compatible requests (see :mod:`serving.worker`).

:func:`create_app` assembles the pieces: the :class:`~serving.runtime.Runtime` (settings, metrics,
the sampler and its worker), the middlewares of :mod:`serving.middleware`, the error handlers of
:mod:`serving.validation` and the routes of :mod:`serving.routes` (bodies in :mod:`serving.schemas`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from serving.middleware import MetricsMiddleware, RequestGuard
from serving.routes import add_routes
from serving.runtime import Runtime, SamplerFactory
from serving.settings import ServerSettings, ServingDefaults, load_defaults
from serving.validation import RequestError, request_error_handler, validation_error_handler


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start loading the model with the app; stop the worker (cancelling queued requests) after."""
    runtime: Runtime = app.state.runtime
    runtime.start()
    try:
        yield
    finally:
        await run_in_threadpool(runtime.stop)


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
    app = FastAPIOffline(  # /docs and /redoc from the package's own Swagger UI / ReDoc files, no CDN
        title="Lumina-Image 2.0 sampler",
        version="0.1.0",
        description="Text-to-image generation with the Lumina-Image 2.0 sampler.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(RequestError, request_error_handler)
    # added last = outermost: metrics see every answer, the guard's 401 / 413 included
    app.add_middleware(RequestGuard, token=runtime.token, max_body_bytes=defaults.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics, routes=app.routes)
    add_routes(app)
    return app
