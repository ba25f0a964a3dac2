"""Pure ASGI middlewares: :class:`RequestGuard` (bearer token and body limit, before the body is
read) and :class:`MetricsMiddleware` (request latency and error counts with bounded labels)."""

from __future__ import annotations

import json
import secrets
import time

from serving.metrics import ServerMetrics

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
