"""The HTTP sampler server (``serving/``): endpoints, validation, auth, metrics, the queue and its
micro-batching, a real ``python -m serving`` process under concurrent load, and model fetching
from a folder, a loopback S3 server and an MLflow registry."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import re
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

import model.sampler.sampler as sampler_module
from common.errors import WeightsNotFoundError
from model.sampler import SamplerConfig
from services.process import free_port, http_answers, running
from serving.app import create_app
from serving.fetch import MARKER, fetch_s3, resolve_source
from serving.settings import ServerSettings, ServingDefaults, load_defaults
from serving.worker import GenerationWorker, Job, QueueFullError, ShuttingDownError, generate_rows

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(
    steps=2,
    height=64,
    width=64,
    max_side=128,
    max_steps=8,
    max_batch=4,
    max_prompt_chars=200,
    queue_size=8,
    batch_window_ms=2,
)


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` (a deadline, not an assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def metric(text: str, name: str, labels: str = "") -> float:
    """Value of one sample in Prometheus text (0 when absent)."""
    pattern = "^" + re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def make_app(source, tmp_path, sampler_factory=None, token=None, on_load_error=None, **limits):
    settings = ServerSettings(
        model_source=str(source), model_dir=tmp_path / "cache", auth_token=token, device="cpu"
    )
    defaults = ServingDefaults(**{**LIMITS, **limits})
    return create_app(
        settings, defaults=defaults, sampler_factory=sampler_factory, on_load_error=on_load_error
    )


class BlockingSampler:
    """Wraps a sampler; ``generate`` signals ``entered`` and waits for ``release``."""

    def __init__(self, inner):
        self.inner = inner
        self.transformer = inner.transformer
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []  # prompts per call
        self.initial_noise = inner.initial_noise

    def generate(self, prompts, **kwargs):
        self.calls.append(len(prompts))
        self.entered.set()
        if not self.release.wait(60):
            raise TimeoutError("test never released the sampler")
        return self.inner.generate(prompts, **kwargs)


def asgi_request(app, method, path, *, headers=(), chunks=(b"",)):
    """Call the ASGI app directly (no server, no lifespan): (status, headers, body, receive calls).

    ``chunks`` is the request body as it streams in (an iterable, maybe long); once it is used up
    the client stays connected until the response is sent."""

    async def run():
        calls, sent = 0, []
        pieces = iter(chunks)
        current = next(pieces, None)

        async def receive():
            nonlocal calls, current
            calls += 1
            if current is None:
                await asyncio.sleep(3600)
            body, current = current, next(pieces, None)
            return {"type": "http.request", "body": body, "more_body": current is not None}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
        }
        await asyncio.wait_for(app(scope, receive, send), 30)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, calls

    return asyncio.run(run())


@pytest.fixture(scope="module")
def client(tiny_folder, tmp_path_factory):
    """An app loading the tiny folder through the real source resolution and loader."""
    app = make_app(tiny_folder, tmp_path_factory.mktemp("serve"))
    with TestClient(app) as test_client:
        assert app.state.runtime.ready.wait(120), app.state.runtime.error
        yield test_client


# ------------------------------------------------------------------------------ happy path
def test_png_of_requested_size_and_deterministic_seed(client):
    body = {"prompt": "a red cat on the left of a blue car", "height": 64, "width": 96, "seed": 7}
    first = client.post("/v1/generate", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-seed"] == "7"
    image = png(first.content)
    assert image.size == (96, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 0  # not a blank image
    again = client.post("/v1/generate", json=body)
    assert np.array_equal(np.asarray(png(again.content)), np.asarray(image))
    other = client.post("/v1/generate", json={**body, "seed": 8})
    assert not np.array_equal(np.asarray(png(other.content)), np.asarray(image))


def test_b64_json_batch(client):
    prompts = ["three yellow apples", "a blue car", "a dog"]
    r = client.post(
        "/v1/generate",
        json={
            "prompt": prompts,
            "negative_prompt": "blurry",
            "seed": 3,
            "steps": 3,
            "response_format": "b64_json",
        },
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["seed"] == 3
    assert len(data["images"]) == 3
    for b64 in data["images"]:
        assert png(base64.b64decode(b64)).size == (64, 64)
    assert data["forward_calls"] == 3  # one (CFG-batched) transformer call per Euler step
    assert data["batch"]["images"] >= 3
    assert set(data["timings"]) == {"queue_s", "generate_s", "encode_s", "total_s"}
    # several prompts with the default png format also come back as JSON
    r = client.post("/v1/generate", json={"prompt": prompts[:2]})
    assert r.headers["content-type"].startswith("application/json") and len(r.json()["images"]) == 2
    assert isinstance(r.json()["seed"], int)  # a random seed is reported when none was given


def test_model_info_page_docs(client, tiny_folder):
    info = client.get("/v1/model").json()
    assert info["profile"] == "tiny" and info["transformer_params"] > 0
    assert info["folder"] == str(tiny_folder) and info["source"] == str(tiny_folder)
    assert info["defaults"]["max_steps"] == 8 and info["defaults"]["solver"] == "euler"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/generate" in page.text and "<form" in page.text
    assert client.get("/docs").status_code == 200
    assert "/v1/generate" in client.get("/openapi.json").json()["paths"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "x", "height": 256}, 422, "height: 256 exceeds max_side 128"),
        ({"prompt": "x", "width": 72}, 422, "width: 72 must be a positive multiple of 16"),
        ({"prompt": "x", "height": 0}, 422, "height: 0 must be a positive multiple of 16"),
        ({"prompt": "x", "steps": 9}, 422, "steps: 9 exceeds max_steps 8"),
        ({"prompt": "x", "steps": 0}, 422, "steps:"),
        ({"prompt": ["x"] * 5}, 422, "5 prompts exceed max_batch 4"),
        ({"prompt": ""}, 422, "prompt must not be empty"),
        ({"prompt": ["ok", "  "]}, 422, "prompt[1]: prompt must not be empty"),
        ({"prompt": []}, 422, "at least one prompt"),
        ({"prompt": "x" * 201}, 422, "201 characters exceed max_prompt_chars 200"),
        ({"prompt": "x", "negative_prompt": ["a", "b"]}, 422, "2 negative prompts for 1 prompts"),
        ({"prompt": "x", "colour": "red"}, 422, "unknown field 'colour'"),
        ({"prompt": "x", "solver": "rk4"}, 422, "solver: Input should be 'euler', 'midpoint' or 'flow_dpm'"),
        ({"prompt": "x", "system_prompt": "D"}, 422, "system_prompt:"),
        ({"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale:"),
        ({"prompt": "x", "response_format": "jpeg"}, 422, "response_format:"),
        ({"prompt": "x", "seed": -1}, 422, "seed:"),
        ({}, 422, "prompt: field required"),
        ("{not json", 400, "invalid JSON body"),
    ],
)
def test_invalid_requests_get_4xx_with_message(client, body, status, message):
    if isinstance(body, str):
        r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "\\ud800"}', "prompt: Value error, not valid Unicode text (lone UTF-16 surrogate"),
        ('{"prompt": ["ok", "a\\udfff"]}', "prompt: Value error, item 1: not valid Unicode text"),
        ('{"prompt": "x", "negative_prompt": "\\ud800"}', "negative_prompt: Value error, not valid Unicode"),
        ('{"prompt": "x", "system_prompt": "\\udbff"}', "system_prompt: Value error, not valid Unicode"),
        ('{"prompt": "x", "\\ud800": 1}', "body: Input should be a valid string"),  # a surrogate key
        ('{"prompt": "x", "steps": true}', "steps: Input should be a valid integer"),
        ('{"prompt": "x", "steps": 2.0}', "steps: Input should be a valid integer"),
        ('{"prompt": "x", "height": "64"}', "height: Input should be a valid integer"),
        ('{"prompt": "x", "seed": true}', "seed: Input should be a valid integer"),
        ('{"prompt": 5}', "prompt"),
        ('{"prompt": "x", "guidance_scale": true}', "guidance_scale: Input should be a valid number"),
        ('{"prompt": "x", "renorm": Infinity}', "renorm: Input should be a finite number"),
        ('{"prompt": "x", "teacache": NaN}', "teacache: Input should be a finite number"),
        ('{"prompt": "x", "guidance_scale": -Infinity}', "guidance_scale: Input should be a finite number"),
        ('{"prompt": "x", "cfg_trunc": 1e400}', "cfg_trunc: Input should be a finite number"),
    ],
)
def test_bad_text_and_loose_types_get_422(client, content, message):
    r = client.post("/v1/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_strict_types_still_take_ints_for_floats_and_unicode(client):
    body = {"prompt": "café 猫 🐱", "guidance_scale": 4, "renorm": 1, "cfg_trunc": 1, "steps": 2, "seed": 1}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text


def test_metrics_move(client):
    before = client.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    client.post("/v1/generate", json={"prompt": ["a", "b"], "response_format": "b64_json"}).raise_for_status()
    assert client.post("/v1/generate", json={"prompt": "x", "steps": 99}).status_code == 422
    after = client.get("/metrics").text
    assert (
        metric(after, "lumina_images_generated_total")
        == metric(before.text, "lumina_images_generated_total") + 2
    )
    assert metric(after, "lumina_request_errors_total", 'status="422"') == (
        metric(before.text, "lumina_request_errors_total", 'status="422"') + 1
    )
    count = 'path="/v1/generate",method="POST",status="200"'
    assert metric(after, "lumina_request_duration_seconds_count", count) == (
        metric(before.text, "lumina_request_duration_seconds_count", count) + 1
    )
    assert "# TYPE lumina_queue_depth gauge" in after and metric(after, "lumina_queue_depth") == 0
    assert metric(after, "lumina_model_ready") == 1


# --------------------------------------------------------------------- readiness, auth, errors
def test_readiness_flips_after_load(tiny_sampler, tiny_folder, tmp_path):
    gate = threading.Event()

    def slow_factory(folder):
        assert gate.wait(60)
        return tiny_sampler

    app = make_app(tiny_folder, tmp_path, sampler_factory=slow_factory)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/generate", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["detail"] and "retry-after" in r.headers
        assert c.get("/v1/model").status_code == 503
        gate.set()
        assert app.state.runtime.ready.wait(60)
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/generate", json={"prompt": "x"}).status_code == 200


def test_load_failure_reported(tmp_path):
    failed = threading.Event()
    app = make_app(tmp_path / "missing", tmp_path, on_load_error=lambda exc: failed.set())
    with TestClient(app) as c:
        assert failed.wait(30)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "model folder not found" in r.json()["error"]
        assert c.get("/healthz").status_code == 200
        assert "failed to load" in c.post("/v1/generate", json={"prompt": "x"}).json()["detail"]


def test_auth_and_sampler_config_error(tiny_sampler, tiny_folder, tmp_path):
    app = make_app(
        tiny_folder, tmp_path, sampler_factory=lambda f: tiny_sampler, token="s3cret", max_side=4096
    )
    with TestClient(app) as c:
        assert app.state.runtime.ready.wait(60)
        r = c.get("/v1/model")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in r.json()["detail"]
        assert c.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/generate", json={"prompt": "x"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/model", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
        r = c.post("/v1/generate", json={"prompt": "x"}, headers=ok)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        # within max_side but beyond the tiny model's RoPE range: the sampler's ConfigError is a 400
        r = c.post("/v1/generate", json={"prompt": "x", "height": 4000, "width": 64}, headers=ok)
        assert r.status_code == 400 and "RoPE range" in r.json()["detail"]
        assert metric(c.get("/metrics").text, "lumina_request_errors_total", 'status="401"') == 3


def test_metric_labels_stay_bounded(client):
    rng = random.Random(0)
    paths = ["/healthz", "/v1/generate", "/metrics", "/no/such/path"]

    def junk() -> str:
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(10))

    for path in paths:  # every (path, method="other", status) series the loop below can make
        client.request(junk(), path)
    client.request(junk(), f"/{junk()}")
    before = client.get("/metrics").text
    for _ in range(300):
        client.request(junk(), rng.choice([*paths, f"/{junk()}"]))
    after = client.get("/metrics").text
    assert len(after.splitlines()) == len(before.splitlines())
    methods = set(re.findall(r'method="([^"]*)"', after))
    paths = set(re.findall(r'path="([^"]*)"', after))
    assert methods <= {"GET", "POST", "HEAD", "other"}, methods
    assert paths <= {r.path for r in client.app.routes} | {"other"}, paths


def test_auth_before_body_and_body_limit(tiny_sampler, tiny_folder, tmp_path):
    # the app is not started: these are answered before the body is read or the model is needed
    app = make_app(tiny_folder, tmp_path, token="tok", max_body_bytes=100_000)
    body = json.dumps({"prompt": "x"}).encode()
    ok = ("authorization", "Bearer tok")
    typed = ("content-type", "application/json")
    # wrong or missing token: 401 without a single receive()
    for headers in [
        (typed,),
        (typed, ("authorization", "Bearer nope")),
        (typed, ("authorization", "Basic tok")),
    ]:
        status, response_headers, text, calls = asgi_request(
            app, "POST", "/v1/generate", headers=headers, chunks=[body]
        )
        assert (status, calls) == (401, 0), text
        assert response_headers["www-authenticate"] == "Bearer" and b"bearer" in text.lower()
    # a Content-Length above the limit: 413 before reading
    status, _, text, calls = asgi_request(
        app, "POST", "/v1/generate", headers=[ok, typed, ("content-length", str(10**9))], chunks=[body]
    )
    assert (status, calls) == (413, 0) and b"max_body_bytes 100000" in text
    # a streamed body (no length) is cut off as soon as it passes the limit; the rest is not read
    endless = (b"x" * 32_768 for _ in range(10_000))
    status, headers, text, calls = asgi_request(
        app, "POST", "/v1/generate", headers=[ok, typed], chunks=endless
    )
    assert (status, calls) == (413, 4) and headers["connection"] == "close", text
    # a body within the limit goes through (the model is not loaded: 503)
    status, _, text, calls = asgi_request(app, "POST", "/v1/generate", headers=[ok, typed], chunks=[body])
    assert status == 503 and b"loading" in text and calls >= 1
    # unprotected routes need no token; the limit holds there too
    assert asgi_request(app, "GET", "/healthz")[0] == 200
    assert asgi_request(app, "POST", "/healthz", headers=[("content-length", "200000")])[0] == 413
    # through the test client as well, with the counted statuses
    with TestClient(app) as c:
        assert (
            c.post(
                "/v1/generate", content=b"{" + b" " * 200_000 + b"}", headers=dict([ok, typed])
            ).status_code
            == 413
        )
        assert c.post("/v1/generate", json={"prompt": "x"}).status_code == 401
        text = c.get("/metrics").text
        # counted with the direct calls above (same app): 413 three times before, 401 three times
        assert metric(text, "lumina_request_errors_total", 'status="413"') == 4
        assert (
            metric(
                text,
                "lumina_request_duration_seconds_count",
                'path="/v1/generate",method="POST",status="401"',
            )
            == 4
        )


def test_defaults_file(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("steps: 4\nmax_steps: 10\nsolver: midpoint\nqueue_size: 3\nmerge_rows: 16\n")
    d = load_defaults(path)
    assert (d.steps, d.max_steps, d.solver.value, d.queue_size, d.merge_rows) == (4, 10, "midpoint", 3, 16)
    path.write_text("stepz: 4\n")
    with pytest.raises(Exception, match="invalid stepz"):
        load_defaults(path)
    path.write_text("steps: 40\nmax_steps: 10\n")
    with pytest.raises(Exception, match="exceed max_steps"):
        load_defaults(path)


# ------------------------------------------------------------------------- queue & batching
def test_queue_full_gives_429(tiny_sampler, tiny_folder, tmp_path):
    blocking = BlockingSampler(tiny_sampler)
    app = make_app(tiny_folder, tmp_path, sampler_factory=lambda f: blocking, queue_size=1)
    with TestClient(app) as c:
        assert app.state.runtime.ready.wait(60)
        worker = app.state.runtime.worker
        with ThreadPoolExecutor(2) as pool:
            running_req = pool.submit(c.post, "/v1/generate", json={"prompt": "first", "seed": 1})
            assert blocking.entered.wait(30)  # the worker is inside generate, the queue is empty
            queued_req = pool.submit(c.post, "/v1/generate", json={"prompt": "second", "seed": 2})
            wait_until(lambda: worker.depth == 1, what="the second request to be queued")
            r = c.post("/v1/generate", json={"prompt": "third"})
            assert r.status_code == 429, r.text
            assert "queue full" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
            assert metric(c.get("/metrics").text, "lumina_queue_depth") == 1
            blocking.release.set()
            assert running_req.result(60).status_code == 200
            assert queued_req.result(60).status_code == 200
        assert metric(c.get("/metrics").text, "lumina_request_errors_total", 'status="429"') == 1


def test_request_timeout_gives_504_and_the_server_recovers(tiny_sampler, tiny_folder, tmp_path):
    blocking = BlockingSampler(tiny_sampler)
    app = make_app(tiny_folder, tmp_path, sampler_factory=lambda f: blocking, request_timeout_s=0.5)
    with TestClient(app) as c:
        assert app.state.runtime.ready.wait(60)
        r = c.post("/v1/generate", json={"prompt": "stuck", "seed": 1})
        assert r.status_code == 504 and "did not finish within 0.5 s" in r.json()["detail"]
        blocking.release.set()  # the model call finishes; the next request is served normally
        wait_until(lambda: app.state.runtime.worker.depth == 0, what="the worker to be idle")
        assert c.post("/v1/generate", json={"prompt": "fine", "seed": 2}).status_code == 200


def test_liveness_reflects_stuck_and_dead_worker(tiny_sampler, tiny_folder, tmp_path):
    blocking = BlockingSampler(tiny_sampler)
    app = make_app(tiny_folder, tmp_path, sampler_factory=lambda f: blocking, liveness_timeout_s=1.0)
    with TestClient(app) as c:
        assert app.state.runtime.ready.wait(60)
        worker = app.state.runtime.worker
        assert c.get("/healthz").json() == {"status": "ok"}
        time.sleep(1.5)  # idle longer than the bound: the idle heartbeat keeps it live
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        with ThreadPoolExecutor(1) as pool:
            try:
                stuck = pool.submit(c.post, "/v1/generate", json={"prompt": "slow", "seed": 1})
                assert blocking.entered.wait(30)
                wait_until(
                    lambda: c.get("/healthz").status_code == 503, 30, "liveness to notice the stuck call"
                )
                r = c.get("/healthz").json()
                assert r["status"] == "unhealthy" and "running one sampler call" in r["error"]
                assert c.get("/readyz").status_code == 503
            finally:
                blocking.release.set()
            assert stuck.result(60).status_code == 200
        wait_until(lambda: c.get("/healthz").status_code == 200, 30, "liveness after the call")

        def die():
            raise RuntimeError("a bug in the worker loop")  # ends the worker thread

        worker._take = die  # the worker calls it for the job after the one it waits for now
        assert c.post("/v1/generate", json={"prompt": "last"}).status_code == 200
        wait_until(lambda: not worker._thread.is_alive(), 30, "the worker thread to end")
        r = c.get("/healthz")
        assert r.status_code == 503 and "died" in r.json()["error"]
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/generate", json={"prompt": "x"})
        assert r.status_code == 503 and "not running" in r.json()["detail"]


def test_disconnected_client_is_dropped_from_queue(tiny_sampler, tiny_folder, tmp_path):
    blocking = BlockingSampler(tiny_sampler)
    app = make_app(tiny_folder, tmp_path, sampler_factory=lambda f: blocking)
    with TestClient(app) as c, ThreadPoolExecutor(1) as pool:
        assert app.state.runtime.ready.wait(60)
        worker = app.state.runtime.worker
        try:
            first = pool.submit(c.post, "/v1/generate", json={"prompt": "first", "seed": 1})
            assert blocking.entered.wait(30)

            async def leave_while_queued():
                left, sent = asyncio.Event(), []
                messages = [
                    {
                        "type": "http.request",
                        "body": json.dumps({"prompt": "second"}).encode(),
                        "more_body": False,
                    }
                ]

                async def receive():
                    if messages:
                        return messages.pop(0)
                    await left.wait()
                    return {"type": "http.disconnect"}

                async def send(message):
                    sent.append(message)

                scope = {
                    "type": "http",
                    "asgi": {"version": "3.0"},
                    "http_version": "1.1",
                    "method": "POST",
                    "scheme": "http",
                    "path": "/v1/generate",
                    "raw_path": b"/v1/generate",
                    "root_path": "",
                    "query_string": b"",
                    "headers": [(b"content-type", b"application/json")],
                    "client": ("127.0.0.1", 1234),
                    "server": ("testserver", 80),
                }
                task = asyncio.ensure_future(app(scope, receive, send))
                for _ in range(3000):
                    if worker.depth == 1:
                        break
                    await asyncio.sleep(0.01)
                assert worker.depth == 1
                left.set()
                await asyncio.wait_for(task, 10)
                return sent

            sent = asyncio.run(leave_while_queued())
            assert sent[0]["status"] == 499
            assert worker.depth == 0 and worker.dropped == 1
        finally:
            blocking.release.set()
        assert first.result(60).status_code == 200
    assert blocking.calls == [1]  # the second request was never generated


def test_cancelled_job_leaves_queue_unrun(tiny_sampler):
    blocking = BlockingSampler(tiny_sampler)
    worker = GenerationWorker(blocking, queue_size=4, max_rows=4)
    worker.start()
    try:
        head = worker.submit(_job(["head"], 0))
        assert blocking.entered.wait(30)
        gone, kept = worker.submit(_job(["gone"], 1)), worker.submit(_job(["kept"], 2))
        assert worker.depth == 2 and gone.cancel()
        assert worker.depth == 1 and worker.dropped == 1  # its place is free at once
        blocking.release.set()
        assert kept.result(60).merged_requests == 1 and head.result(60)
    finally:
        blocking.release.set()
        worker.stop()
    assert blocking.calls == [1, 1]


class PoisonSampler(BlockingSampler):
    """Raises a plain RuntimeError (not a LuminaError) for any call that holds the prompt "poison"."""

    def generate(self, prompts, **kwargs):
        if "poison" in prompts:
            self.calls.append(len(prompts))
            raise RuntimeError("cannot draw poison")
        return super().generate(prompts, **kwargs)


def test_failed_merged_call_fails_only_the_bad_request(tiny_sampler):
    sampler = PoisonSampler(tiny_sampler)
    worker = GenerationWorker(sampler, queue_size=10, max_rows=4)
    worker.start()
    try:
        head = worker.submit(_job(["head"], 0))
        assert sampler.entered.wait(30)
        good_a, bad, good_b = (worker.submit(_job([p], i)) for i, p in enumerate(["a", "poison", "b"]))
        sampler.release.set()
        assert len(good_a.result(60).images) == 1 and len(good_b.result(60).images) == 1
        with pytest.raises(RuntimeError, match="cannot draw poison"):
            bad.result(60)
        head.result(60)
    finally:
        sampler.release.set()
        worker.stop()
    assert sampler.calls == [1, 3, 1, 1, 1]  # head, the merged call that failed, then each alone
    assert good_a.result().merged_requests == 1


def _job(prompts, seed, steps=2, size=64, teacache=0.0):
    return Job(
        list(prompts), [""] * len(prompts), seed, size, size, SamplerConfig(steps=steps, teacache=teacache)
    )


def test_worker_merges_compatible_jobs(tiny_sampler):
    blocking = BlockingSampler(tiny_sampler)
    worker = GenerationWorker(blocking, queue_size=10, max_rows=4, batch_window_s=0.0)
    worker.start()
    try:
        head = worker.submit(_job(["head"], 0))
        assert blocking.entered.wait(30)
        # queued while the worker is busy: a, b, c fit one call of 4 rows; d has other settings;
        # e would make 5 rows; f uses TeaCache (never merged)
        jobs = {
            "a": _job(["a red cat"], 11),
            "b": _job(["a blue car", "three apples"], 12),
            "d": _job(["other steps"], 13, steps=3),
            "c": _job(["a dog"], 14),
            "e": _job(["one more"], 15),
            "f": _job(["teacache"], 16, teacache=0.5),
        }
        futures = {name: worker.submit(job) for name, job in jobs.items()}
        assert worker.depth == 6
        blocking.release.set()
        results = {name: f.result(60) for name, f in futures.items()}
        head.result(60)
    finally:
        worker.stop()
    assert blocking.calls == [1, 4, 1, 1, 1]  # head, a+b+c, d, e, f
    assert [results[n].merged_requests for n in "abcdef"] == [3, 3, 3, 1, 1, 1]
    assert [len(results[n].images) for n in "abcdef"] == [1, 2, 1, 1, 1, 1]
    # a merged request's images are the ones it gets alone (same seed noise), up to float rounding
    alone = tiny_sampler.generate(
        ["a blue car", "three apples"],
        negative_prompt=["", ""],
        height=64,
        width=64,
        seed=12,
        config=SamplerConfig(steps=2),
    ).images
    for merged, single in zip(results["b"].images, alone, strict=True):
        assert np.abs(np.asarray(merged, dtype=int) - np.asarray(single, dtype=int)).max() <= 2


def test_batch_window_only_under_load(tiny_sampler):
    # an idle worker runs a lone request at once, however long the window
    idle = GenerationWorker(tiny_sampler, queue_size=4, max_rows=2, batch_window_s=60.0)
    idle.start()
    try:
        assert idle.submit(_job(["alone"], 1)).result(timeout=30).merged_requests == 1
    finally:
        idle.stop()
    # under load it waits for a compatible request that arrives after it took the first one
    blocking = BlockingSampler(tiny_sampler)
    worker = GenerationWorker(blocking, queue_size=4, max_rows=2, batch_window_s=60.0)
    worker.start()
    try:
        head = worker.submit(_job(["head"], 0))
        assert blocking.entered.wait(30)
        first = worker.submit(_job(["first"], 1))  # arrives while the worker is busy: load
        blocking.release.set()
        wait_until(lambda: head.done() and worker.depth == 0, what="the worker to take the first job")
        second = worker.submit(_job(["second"], 2))
        assert first.result(30).merged_requests == 2 and second.result(30).merged_requests == 2
    finally:
        worker.stop()
    assert blocking.calls == [1, 2]


def test_generate_rows_matches_standalone_and_restores_torch(tiny_sampler):
    import torch

    cfg = SamplerConfig(steps=2)
    merged = generate_rows(
        tiny_sampler,
        ["a red cat", "x", "y"],
        ["", "blurry", ""],
        [(5, 1), (9, 2)],
        height=64,
        width=64,
        config=cfg,
    ).images
    assert sampler_module.torch is torch
    first = tiny_sampler.generate(["a red cat"], height=64, width=64, seed=5, config=cfg).images
    rest = tiny_sampler.generate(
        ["x", "y"], negative_prompt=["blurry", ""], height=64, width=64, seed=9, config=cfg
    ).images
    diffs = [
        np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
        for a, b in zip(merged, first + rest, strict=True)
    ]
    assert max(diffs) <= 2, diffs
    # and the seeds matter: the rows are not all drawn from one seed
    swapped = generate_rows(
        tiny_sampler,
        ["a red cat", "x", "y"],
        ["", "blurry", ""],
        [(9, 1), (5, 2)],
        height=64,
        width=64,
        config=cfg,
    ).images
    assert np.abs(np.asarray(swapped[0], dtype=int) - np.asarray(merged[0], dtype=int)).max() > 10


def test_worker_stop_cancels_queue_and_refuses_new_jobs(tiny_sampler):
    blocking = BlockingSampler(tiny_sampler)
    worker = GenerationWorker(blocking, queue_size=1, max_rows=4)
    worker.start()
    running_job = worker.submit(_job(["running"], 0))
    assert blocking.entered.wait(30)
    queued = worker.submit(_job(["queued"], 1))
    with pytest.raises(QueueFullError):
        worker.submit(_job(["overflow"], 2))
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    with pytest.raises(ShuttingDownError):
        queued.result(30)
    with pytest.raises(ShuttingDownError):
        worker.submit(_job(["late"], 3))
    blocking.release.set()  # the running call finishes (drained), then the worker exits
    assert len(running_job.result(60).images) == 1
    stopper.join(60)
    assert not stopper.is_alive() and not worker._thread.is_alive()


def test_docs_work_offline(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        assert re.findall(r"https?://[^\s'\"<>]+", html.text) == [], f"{page} loads from the network"
        assets = re.findall(r"""(?:href|src|spec-url|url)\s*[=:]\s*['"](/[^'"]+)['"]""", html.text)
        assert "/openapi.json" in assets and any(a.endswith(".js") for a in assets), assets
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


def test_cli_sets_uvicorn_connection_bounds(tiny_folder, monkeypatch):
    import uvicorn

    from serving.__main__ import serve

    configs = []

    class NoServer:
        def __init__(self, config):
            configs.append(config)

        def run(self):
            pass

    monkeypatch.setattr(uvicorn, "Server", NoServer)
    monkeypatch.delenv("LUMINA_DEFAULTS_FILE", raising=False)
    for key, value in {
        "LUMINA_TIMEOUT_KEEP_ALIVE_S": "7",
        "LUMINA_MAX_HEADER_BYTES": "8192",
        "LUMINA_LIMIT_CONCURRENCY": "32",
    }.items():
        monkeypatch.setenv(key, value)
    serve(
        host="127.0.0.1",
        port=free_port(),
        model=str(tiny_folder),
        model_dir=None,
        defaults_file=None,
        device="cpu",
        threads=None,
        log_level="warning",
    )
    (config,) = configs
    assert (config.http, config.timeout_keep_alive, config.h11_max_incomplete_event_size) == ("h11", 7, 8192)
    assert config.limit_concurrency == 32


# ----------------------------------------------------------------- real server, concurrency
@pytest.mark.slow
def test_cli_server_under_concurrent_load(tiny_folder, tmp_path, monkeypatch):
    port = free_port()
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(
        "steps: 2\nheight: 64\nwidth: 64\nmax_side: 128\nqueue_size: 32\nbatch_window_ms: 20\n"
    )
    # the server process inherits these; one torch thread, because two-thread OpenMP teams stall at
    # every barrier when the 2 CI cores are shared with other processes
    for key, value in {
        "LUMINA_DEFAULTS_FILE": str(defaults),
        "LUMINA_AUTH_TOKEN": "tok",
        "LUMINA_TORCH_THREADS": "1",
        "LUMINA_MODEL_SOURCE": str(tmp_path / "overridden-by-model-flag"),
    }.items():
        monkeypatch.setenv(key, value)
    cmd = [
        sys.executable,
        "-m",
        "serving",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(tiny_folder),
    ]
    base = f"http://127.0.0.1:{port}"
    with running(cmd, http_answers(f"{base}/healthz"), log_file=tmp_path / "server.log", timeout=120) as proc:
        wait_until(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, 120, "readiness")
        headers = {"Authorization": "Bearer tok"}
        assert requests.post(f"{base}/v1/generate", json={"prompt": "x"}, timeout=10).status_code == 401

        def one(i: int) -> tuple[int, tuple[int, int]]:
            r = requests.post(
                f"{base}/v1/generate", json={"prompt": f"prompt {i}", "seed": i}, headers=headers, timeout=120
            )
            return r.status_code, png(r.content).size if r.status_code == 200 else (0, 0)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(12)))
        assert results == [(200, (64, 64))] * 12
        text = requests.get(f"{base}/metrics", timeout=10).text
        assert metric(text, "lumina_images_generated_total") == 12
        assert 1 <= metric(text, "lumina_generate_calls_total") <= 12
        info = requests.get(f"{base}/v1/model", headers=headers, timeout=10).json()
        assert info["folder"] == str(tiny_folder) and info["torch_threads"] == 1
        assert info["defaults"]["steps"] == 2 and info["defaults"]["batch_window_ms"] == 20
        proc.terminate()
        assert proc.wait(30) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log


@pytest.mark.slow
def test_cli_server_exits_2_when_model_cannot_load(tmp_path):
    cmd = [sys.executable, "-m", "serving", "--port", str(free_port()), "--model", str(tmp_path / "none")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1]
        == f"error: model failed to load: model folder not found: {tmp_path / 'none'}"
    )
    # with JSON logs (the chart's default) uvicorn's own lines and the failure are JSON records too
    env = {**os.environ, "LUMINA_LOG_FORMAT": "json", "TQDM_DISABLE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1].startswith("error: model failed to load")
    records = [json.loads(line) for line in lines[:-1]]
    assert {"uvicorn.error", "lumina.cli"} <= {r["logger"] for r in records}
    assert records[-1]["level"] == "ERROR" and "model folder not found" in records[-1]["message"]


# ------------------------------------------------------------------------------- fetching
def test_fetch_local_folder_and_bad_sources(tiny_folder, tmp_path):
    assert resolve_source(str(tiny_folder), tmp_path) == tiny_folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="not a diffusers pipeline folder"):
        resolve_source(str(tmp_path / "empty"), tmp_path / "dest")
    with pytest.raises(WeightsNotFoundError, match="unsupported model source"):
        resolve_source("https://example.com/model", tmp_path / "dest")
    with pytest.raises(WeightsNotFoundError, match="no model source"):
        resolve_source("", tmp_path / "dest")
    with pytest.raises(WeightsNotFoundError, match="expected models:/<name>@<alias>"):
        resolve_source("models:/justaname", tmp_path / "dest")


def test_fetch_cli(tiny_folder, tmp_path):
    fetch = [sys.executable, "-m", "serving.fetch"]
    ok = subprocess.run(
        [*fetch, "--source", str(tiny_folder), "--dest", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == str(tiny_folder)
    bad = subprocess.run(
        [*fetch, "--source", str(tmp_path / "nope"), "--dest", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: model folder not found: {tmp_path / 'nope'}"


@pytest.fixture
def s3_endpoint(monkeypatch):
    from services.s3 import DUMMY_CREDENTIALS, s3_server

    with s3_server() as endpoint:
        for key, value in {
            **DUMMY_CREDENTIALS,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        yield endpoint


def test_fetch_from_s3(s3_endpoint, tiny_folder, tmp_path):
    from model.sampler import LuminaSampler
    from services.s3 import ensure_bucket, s3_client

    ensure_bucket("models")
    client = s3_client()
    files = sorted(p for p in tiny_folder.rglob("*") if p.is_file())
    for path in files:
        client.upload_file(str(path), "models", f"lumina/tiny/{path.relative_to(tiny_folder)}")
    # a sibling prefix that shares the name start must not leak into the download
    client.put_object(Bucket="models", Key="lumina/tiny-other/model_index.json", Body=b"{}")

    dest = tmp_path / "cache"
    folder = fetch_s3("s3://models/lumina/tiny", dest, page_size=3)  # several pages
    assert sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != MARKER) == [
        p.relative_to(tiny_folder) for p in files
    ]
    sampler = LuminaSampler.load(folder)
    assert sampler.generate("x", height=64, width=64, config=SamplerConfig(steps=1)).images[0].size == (
        64,
        64,
    )

    # a second resolve of the same source reuses the download (the bucket is emptied first)
    for path in files:
        client.delete_object(Bucket="models", Key=f"lumina/tiny/{path.relative_to(tiny_folder)}")
    assert resolve_source("s3://models/lumina/tiny", dest) == folder
    with pytest.raises(WeightsNotFoundError, match="no objects under s3://models/lumina/tiny"):
        resolve_source("s3://models/lumina/tiny", tmp_path / "fresh")
    with pytest.raises(WeightsNotFoundError, match="cannot download s3://no-such-bucket/x"):
        resolve_source("s3://no-such-bucket/x", tmp_path / "fresh")

    # another source into the same folder replaces the earlier download; foreign files are never deleted
    other = resolve_source("s3://models/lumina/tiny-other", dest)
    assert other == dest and sorted(p.name for p in dest.iterdir()) == [".lock", MARKER, "model_index.json"]
    (tmp_path / "volume" / "lost+found").mkdir(parents=True)  # a fresh ext4 volume root is fine
    assert (resolve_source("s3://models/lumina/tiny-other", tmp_path / "volume") / "lost+found").is_dir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(WeightsNotFoundError, match=r"holds other files \(notes.txt\); use an empty folder"):
        resolve_source("s3://models/lumina/tiny-other", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"

    # the CLI with the environment the Helm chart sets
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.fetch",
            "--source",
            "s3://models/lumina/tiny-other",
            "--dest",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "cli"


@pytest.mark.slow
def test_fetch_from_mlflow_registry(tiny_folder, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("serving-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_folder), "pipeline")
    client = MlflowClient()
    client.create_registered_model("lumina-tiny")
    version = client.create_model_version(
        "lumina-tiny", source=f"{run.info.artifact_uri}/pipeline", run_id=run.info.run_id
    )
    client.set_registered_model_alias("lumina-tiny", "champion", version.version)

    folder = resolve_source("models:/lumina-tiny@champion", tmp_path / "cache")
    assert (folder / "model_index.json").read_bytes() == (tiny_folder / "model_index.json").read_bytes()
    assert resolve_source("models:/lumina-tiny/1", tmp_path / "by-version").name == "pipeline"
    with pytest.raises(WeightsNotFoundError, match="alias staging not found"):
        resolve_source("models:/lumina-tiny@staging", tmp_path / "other")
    mlflow.set_tracking_uri(None)
