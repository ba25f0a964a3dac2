"""Dual-panel (Template C) grids and image-conditioned generation (model/sampler/conditioning.py):
the known panel kept by replacement, non-square grid sizes, ``lumina sample --task`` and
``POST /v1/generate`` with an input image."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from common.errors import ConfigError
from model.prompts import apply_system_prompt, panel_fill_ins, panel_prompt
from model.sampler import LuminaSampler, SamplerConfig, Solver
from model.sampler.conditioning import Layout, PanelCondition, Task, panel_size, panel_slices
from serving.worker import GenerationWorker, Job, PanelJob
from tests.oracle import OracleDenoiser
from tests.test_serving import BlockingSampler, make_app, png

GRID = dict(height=128, width=64)  # an upper-lower grid of two 64x64 panels
STEPS = SamplerConfig(steps=3)


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), np.uint8)
    base[: height // 2, :, 0] = 220
    base[:, width // 3 :, 2] = 180
    return Image.fromarray(np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("solver", list(Solver))
def test_known_panel_is_the_reference_and_only_it_changes(tiny_pipe, solver):
    target = torch.randn(1, 16, 16, 8)
    sampler = LuminaSampler.from_pipeline(tiny_pipe)
    sampler.denoiser = OracleDenoiser(tiny_pipe.transformer, target)
    config = SamplerConfig(steps=5, solver=solver, guidance_scale=1.0)
    plain = sampler.generate("x", **GRID, seed=3, config=config, output_type="latent")
    reference = torch.randn(1, 16, 8, 8)
    condition = PanelCondition(Layout.UPPER_LOWER, Task.DEPTH, reference)
    kept = sampler.generate("x", **GRID, seed=3, config=config, output_type="latent", condition=condition)
    assert condition.known == 0 and condition.generated == 1  # depth: the image (upper) is known
    assert torch.equal(kept.latents[..., :8, :], reference)  # exactly the reference at t = 1
    assert torch.equal(kept.latents[..., 8:, :], plain.latents[..., 8:, :])  # the rest untouched
    assert not torch.equal(plain.latents[..., :8, :], reference)
    assert torch.equal(kept.images, kept.latents[..., 8:, :])  # the answer is the generated panel


def test_replacement_follows_the_flow_path_with_one_noise_draw():
    reference, initial = torch.randn(2, 16, 8, 4), torch.randn(2, 16, 8, 8)
    condition = PanelCondition("left-right", "image-from-canny", reference)
    assert (condition.known, condition.generated) == (1, 0)  # the map (right) is known
    hook = condition.step_hook(initial)
    assert torch.equal(hook(initial, 0.0), initial)  # at t = 0 the known panel is its own noise
    x = torch.randn_like(initial)
    out = hook(x, 0.3)
    torch.testing.assert_close(out[..., 4:], 0.3 * reference + 0.7 * initial[..., 4:])
    assert torch.equal(out[..., :4], x[..., :4])  # the generated panel is left alone
    assert torch.equal(hook(out, 1.0)[..., 4:], reference)


def test_real_model_grid_panel_and_unchanged_without_condition(tiny_sampler):
    image = picture()
    base = tiny_sampler.generate("a cat", **GRID, seed=1, config=STEPS, output_type="latent")
    # a condition without a reference (text-only grid) and Template B: the very same computation
    grid = PanelCondition("upper-lower", "depth", output="grid")
    same = tiny_sampler.generate("a cat", **GRID, seed=1, config=STEPS, output_type="latent", condition=grid)
    assert torch.equal(same.latents, base.latents) and torch.equal(same.images, base.latents)

    condition = PanelCondition.from_image(
        image, task="depth", layout="upper-lower", **GRID, vae=tiny_sampler.vae
    )
    assert tuple(condition.reference.shape) == (1, 16, 8, 8)
    res = tiny_sampler.generate(["a cat", "a dog"], **GRID, seed=1, config=STEPS, condition=condition)
    assert [im.size for im in res.images] == [(64, 64), (64, 64)]
    assert torch.equal(res.latents[..., :8, :], condition.reference.expand(2, -1, -1, -1))
    # the model sees the kept panel: the generated panel is not the unconditioned one
    assert not torch.allclose(res.latents[:1, :, 8:, :], base.latents[..., 8:, :])
    again = tiny_sampler.generate(["a cat", "a dog"], **GRID, seed=1, config=STEPS, condition=condition)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.images[0]))
    # left-right: the image is the left panel; image-from-sketch keeps the (right) sketch
    lr = PanelCondition.from_image(image, task="image-from-sketch", layout="left-right", height=64,
                                   width=128, vae=tiny_sampler.vae)  # fmt: skip
    out = tiny_sampler.generate("a cat", height=64, width=128, seed=2, config=STEPS, condition=lr)
    assert out.images[0].size == (64, 64)
    assert torch.equal(out.latents[..., 8:], lr.reference)


def test_template_c_prompts_for_tasks():
    assert panel_fill_ins("depth") == {
        "panel_a": "lower half",
        "panel_kind": "depth map",
        "panel_b": "upper half",
    }
    assert panel_prompt("a cat", "image-from-canny", "left-right").startswith(
        "Generate a dual-panel image where the right half displays a canny edge map, while the left half "
        "retains the original image"
    )
    assert panel_prompt("a cat", "sketch").endswith("<Prompt Start> a cat")
    assert PanelCondition("upper-lower", "depth").fill_ins == panel_fill_ins("depth", "upper-lower")
    assert apply_system_prompt("x", "C", **panel_fill_ins("depth")) == panel_prompt("x", "depth")
    with pytest.raises(ConfigError, match="unknown panel kind 'normal'"):
        panel_fill_ins("normal")
    with pytest.raises(ConfigError, match="unknown task"):
        PanelCondition("upper-lower", "normal")
    with pytest.raises(ConfigError, match="unknown layout"):
        PanelCondition("diagonal", "depth")


def test_grid_sizes(tiny_sampler):
    assert panel_size("upper-lower", 128, 64) == (64, 64) and panel_size("left-right", 64, 128) == (64, 64)
    assert panel_slices(Layout.LEFT_RIGHT, 1, 8, 16) == (slice(0, 8), slice(8, 16))
    out = tiny_sampler.generate(
        "x", height=32, width=2032, seed=0, config=SamplerConfig(steps=1), output_type="np"
    )
    assert out.images.shape == (1, 32, 2032, 3)  # a long non-square grid within the RoPE range
    with pytest.raises(ConfigError, match=r"RoPE range \(max height 2032 px, max width 2032 px\)"):
        tiny_sampler.generate("x", height=2048, width=64, config=STEPS)
    with pytest.raises(ConfigError, match="upper-lower grid height 48 must be a positive multiple of 32"):
        tiny_sampler.generate(
            "x", height=48, width=64, config=STEPS, condition=PanelCondition("upper-lower", "depth")
        )
    wrong = PanelCondition("upper-lower", "depth", torch.zeros(1, 16, 8, 4))
    with pytest.raises(ConfigError, match="do not fit the known panel"):
        tiny_sampler.generate("x", **GRID, config=STEPS, condition=wrong)


# ----------------------------------------------------------------------------------- CLI
def test_cli_errors_are_one_line(cli, tiny_folder, tmp_path):
    base = ["sample", "--model", str(tiny_folder), "--prompt", "a cat", "--height", "128", "--width", "64"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cases = [
        (["--task", "depth", "--condition-image", str(tmp_path / "missing.png")], "does not exist"),
        (["--task", "depth", "--condition-image", str(broken)], "cannot be decoded"),
        (["--condition-image", str(broken)], "--condition-image needs --task"),
        (["--task", "normal"], "unknown task 'normal'"),
        (["--task", "depth", "--layout", "diagonal"], "unknown layout 'diagonal'"),
        (["--task", "depth", "--height", "48"], "grid height 48 must be a positive multiple of 32"),
    ]
    for extra, message in cases:
        result = cli("model.cli", *base, *extra)
        assert result.returncode == 2, (extra, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (extra, lines)


def test_cli_samples_the_generated_panel(cli, tiny_folder, tmp_path):
    source = tmp_path / "cat.png"
    picture().save(source)
    out = tmp_path / "out"
    args = ["sample", "--model", str(tiny_folder), "--prompt", "a cat", "--height", "64", "--width", "128",
            "--steps", "2", "--task", "image-from-depth", "--layout", "left-right",
            "--condition-image", str(source), "--out", str(out)]  # fmt: skip
    result = cli("model.cli", *args)
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "000000_00.png").size == (64, 64)
    grid = cli("model.cli", *args, "--full-grid")
    assert grid.returncode == 0 and Image.open(out / "000000_00.png").size == (128, 64)


# -------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def client(tiny_sampler, tiny_folder, tmp_path_factory):
    app = make_app(
        tiny_folder, tmp_path_factory.mktemp("cond"), sampler_factory=lambda folder: tiny_sampler,
        max_input_image_bytes=40_000, max_input_pixels=128 * 128, max_body_bytes=200_000,
    )  # fmt: skip
    with TestClient(app) as test_client:
        assert app.state.runtime.ready.wait(60), app.state.runtime.error
        yield test_client


def test_server_returns_the_generated_panel(client):
    body = {
        "prompt": "a cat",
        "height": 128,
        "width": 64,
        "seed": 4,
        "task": "depth",
        "input_image": encoded(picture()),
    }
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    image = png(r.content)
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    again = client.post("/v1/generate", json=body)
    assert np.array_equal(np.asarray(png(again.content)), np.asarray(image))
    # a JPEG as a data: URL, left-right, b64_json
    jpeg = "data:image/jpeg;base64," + encoded(picture(), "JPEG")
    lr = {
        **body,
        "height": 64,
        "width": 128,
        "layout": "left-right",
        "input_image": jpeg,
        "response_format": "b64_json",
    }
    r = client.post("/v1/generate", json=lr)
    assert r.status_code == 200, r.text
    assert png(base64.b64decode(r.json()["images"][0])).size == (64, 64)
    assert r.json()["batch"] == {"requests": 1, "images": 1}
    # a task without an image: the whole Template C grid
    r = client.post("/v1/generate", json={"prompt": "a cat", "height": 128, "width": 64, "task": "canny"})
    assert r.status_code == 200 and png(r.content).size == (64, 128)
    defaults = client.get("/v1/model").json()["defaults"]
    assert defaults["max_input_image_bytes"] == 40_000 and defaults["max_input_pixels"] == 128 * 128


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb, without the data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_bad_input_images_get_4xx(client):
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    gif = io.BytesIO()
    picture().save(gif, format="GIF")
    full_png = base64.b64decode(encoded(picture()))
    cases = [
        ({"input_image": "not base64!"}, 422, "input_image: not valid base64"),
        ({"input_image": _b64(b"just some text, not an image")}, 422, "input_image: not a PNG or JPEG image"),
        ({"input_image": _b64(gif.getvalue())}, 422, "input_image: not a PNG or JPEG image"),
        ({"input_image": _b64(full_png[: len(full_png) // 2])}, 422, "input_image: cannot decode the PNG"),
        ({"input_image": ""}, 422, "input_image: empty"),
        ({"input_image": encoded(noisy)}, 413, "exceed max_input_image_bytes 40000"),
        (
            {"input_image": encoded(Image.new("RGB", (200, 100)))},
            413,
            "200x100 = 20000 pixels exceed max_input",
        ),
        # checked from the header, before decoding (this one has no data for its size)
        ({"input_image": _b64(_png_header_only(1000, 1000))}, 413, "1000000 pixels exceed max_input_pixels"),
        ({"input_image": _b64(_png_header_only(50_000, 50_000))}, 413, "could be decompression bomb"),
        ({"input_image": 5}, 422, "input_image: Input should be a valid string"),
        ({"task": "normal"}, 422, "task: Input should be"),
        ({"layout": "diagonal"}, 422, "layout: Input should be"),
        ({"task": None, "input_image": encoded(picture())}, 422, "input_image: needs a task"),
        ({"height": 48, "width": 64}, 422, "upper-lower grid height 48 must be a positive multiple of 32"),
    ]
    for extra, status, message in cases:
        body = {"prompt": "a cat", "height": 128, "width": 64, "task": "depth", **extra}
        body = {k: v for k, v in body.items() if v is not None}
        r = client.post("/v1/generate", json=body)
        assert r.status_code == status, (extra.keys(), r.text)
        assert message in r.json()["detail"], (extra.keys(), r.json())


def test_panel_jobs_are_never_merged(tiny_sampler):
    blocking = BlockingSampler(tiny_sampler)
    blocking.vae = tiny_sampler.vae
    worker = GenerationWorker(blocking, queue_size=10, max_rows=4)
    worker.start()
    config = SamplerConfig(steps=2, system_prompt="C")

    def job(prompt, panels=None):
        return Job([prompt], [""], 5, 128, 64, config, panels=panels)

    try:
        head = worker.submit(job("head"))
        assert blocking.entered.wait(30)
        keep = PanelJob(Task.DEPTH, Layout.UPPER_LOWER, picture())
        futures = [worker.submit(j) for j in (job("a"), job("b", keep), job("c"), job("d", keep))]
        blocking.release.set()
        results = [f.result(60) for f in futures]
        head.result(60)
    finally:
        worker.stop()
    assert blocking.calls == [1, 2, 1, 1]  # head, a + c merged, each panel job alone
    assert [r.merged_requests for r in results] == [2, 1, 2, 1]
    assert [r.images[0].size for r in results] == [(64, 128), (64, 64), (64, 128), (64, 64)]
