"""The try-it page at ``GET /`` driven in headless Chromium against a real ``python -m serving``.

A person's path through the page: load it, type a prompt, set the size, steps and seed, click
Generate, see the image; and for a request the server refuses, see the server's message. The browser
is Debian's ``chromium-headless-shell`` fetched into ``.cache/browser/`` on first use by
``tools/browser/chromium.py`` (or ``LUMINA_CHROMIUM``), driven with Playwright. Without Playwright or
a browser the tests skip with the reason, unless ``LUMINA_REQUIRE_BROWSER=1`` (then they fail).
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from services.process import free_port, http_answers, running

TOKEN = "page-token"
# server defaults differ from what the page asks for, so the image shows the page sent its fields
DEFAULTS = "steps: 4\nheight: 64\nwidth: 64\nmax_side: 128\nmax_steps: 8\nqueue_size: 8\n"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(browser, tiny_folder, tmp_path_factory):
    """``python -m serving`` on a free loopback port with the tiny model and a bearer token."""
    tmp = tmp_path_factory.mktemp("page")
    (tmp / "defaults.yaml").write_text(DEFAULTS)
    env = {
        "LUMINA_DEFAULTS_FILE": str(tmp / "defaults.yaml"),
        "LUMINA_AUTH_TOKEN": TOKEN,
        "LUMINA_TORCH_THREADS": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # running() starts the process with this environment
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving", "--port", str(port), "--model", str(tiny_folder)]
    try:
        with running(cmd, http_answers(f"{base}/healthz"), log_file=tmp / "server.log", timeout=120):
            deadline = time.monotonic() + 120
            while requests.get(f"{base}/readyz", timeout=5).status_code != 200:
                if time.monotonic() > deadline:
                    pytest.fail("server not ready in 120 s: " + (tmp / "server.log").read_text()[-2000:])
                time.sleep(0.1)
            yield base
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def page(browser, server):
    """A fresh browser context (empty localStorage) on the page; fails the test on page errors."""
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    response = tab.goto(server + "/")
    assert response is not None and response.status == 200
    assert tab.title() == "Lumina sampler"
    # the page asks /readyz once on load; the server fixture waited for readiness first
    tab.locator("#ready").filter(has_text="model ready").wait_for()
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def fill_form(page, prompt: str, **fields: int) -> None:
    page.locator("#prompt").fill("")
    page.locator("#prompt").press_sequentially(prompt)  # typed key by key, as a person would
    for name, value in fields.items():
        page.locator(f"#{name}").fill(str(value))
    page.locator("#token").fill(TOKEN)


def png_of(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix), data_url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))
    image.load()
    return image


def click_generate_and_wait(page) -> str:
    """Click Generate and wait until the page has the answer; the status line it shows."""
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(
        "() => !document.getElementById('go').disabled"
        " && !['', 'generating…'].includes(document.getElementById('status').textContent)"
    )
    return page.locator("#status").text_content()


def test_generate_shows_image_of_requested_size(page, server):
    request = {"width": 96, "height": 64, "steps": 2, "seed": 7}
    fill_form(page, "a red cat on the left of a blue car", **request)
    status = click_generate_and_wait(page)
    assert page.locator("#status").get_attribute("class") != "error", status
    assert status.startswith("seed 7 · "), status
    assert page.locator("#status").get_attribute("data-state") == "done"
    image = page.locator("#images img")
    assert image.count() == 1, page.locator("#images").inner_html()[:200]
    assert image.is_visible()
    # decoded by the browser, at the requested size (96 wide, not the server's default 64)
    page.wait_for_function("() => document.querySelector('#images img').complete", timeout=10_000)
    size = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert size == [96, 64], f"naturalWidth x naturalHeight {size} (0 x 0: the PNG did not decode)"
    # the page shows what the API gives for the same request (same PNG pixels)
    shown = png_of(image.get_attribute("src"))
    assert shown.size == (96, 64)
    direct = requests.post(
        server + "/v1/generate",
        json={"prompt": "a red cat on the left of a blue car", **request},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert direct.status_code == 200, direct.text
    expected = np.asarray(Image.open(io.BytesIO(direct.content)).convert("RGB"))
    assert np.array_equal(np.asarray(shown.convert("RGB")), expected)
    assert expected.std() > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"height": 144}, "422: height: 144 exceeds max_side 128"),
        ({"steps": 9}, "422: steps: 9 exceeds max_steps 8"),
        # 100 is caught by the browser first (step=16): with the form's own check switched off the
        # request reaches the server and its message is shown
        ({"height": 100, "novalidate": True}, "422: height: 100 must be a positive multiple of 16"),
    ],
)
def test_server_error_message_shown(page, fields, message):
    fields = dict(fields)
    if fields.pop("novalidate", False):
        page.locator("#form").evaluate("form => { form.noValidate = true; }")
    fill_form(page, "a cat", width=64, steps=fields.pop("steps", 2), **fields)
    status = click_generate_and_wait(page)
    assert status == message
    assert page.locator("#status").get_attribute("class") == "error"
    assert page.locator("#status").get_attribute("data-state") == "error"
    assert page.locator("#images img").count() == 0
    assert page.locator("#go").is_enabled()


def test_browser_blocks_size_off_the_grid(page):
    """height 100 is not on the input's step of 16: the form is invalid and nothing is sent."""
    fill_form(page, "a cat", width=64, height=100, steps=2)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))
    page.get_by_role("button", name="Generate").click()
    assert page.locator("#height").evaluate("e => e.validity.stepMismatch")
    assert page.locator("#height").evaluate("e => e.validationMessage") != ""
    page.wait_for_timeout(300)
    assert not any("/v1/generate" in url for url in sent)
    assert page.locator("#status").text_content() == ""
    assert page.locator("#images img").count() == 0
