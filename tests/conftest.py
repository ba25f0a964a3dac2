"""Shared fixtures: tiny random-weight pipelines built offline once per session, and one trained tiny
stage (``trained_tiny``) for the tests that need "a model that has learned something"."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from model.checkpoint import build_pipeline, save_pipeline
from model.sampler import LuminaSampler
from tests.shapes import make_manifest

if TYPE_CHECKING:
    from components.train.trainer import StageResult

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@dataclass(frozen=True)
class TrainedTiny:
    """The shapes manifest, the lowres stage trained on it, and the untrained initial pipeline's seed."""

    manifest: Path
    output_dir: Path
    result: StageResult
    init_seed: int = 0


@pytest.fixture(scope="session")
def shapes_manifest(tmp_path_factory) -> Path:
    """24 coloured shapes with ground-truth captions (tests/shapes.py)."""
    return make_manifest(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def trained_tiny(shapes_manifest, tmp_path_factory) -> TrainedTiny:
    """The tiny profile's lowres stage trained for 120 steps on the shapes (real DeepSpeed engine,
    checkpoints every 60 steps), trained once per session: ~12 s on 2 cores."""
    from components.train.config import stage_config
    from components.train.trainer import train_stage

    out = tmp_path_factory.mktemp("trained") / "lowres"
    cfg = stage_config("lowres", manifest=shapes_manifest, output_dir=out, steps=120, global_batch=8,
                       micro_batch=4, checkpoint_every=60)  # fmt: skip
    return TrainedTiny(manifest=shapes_manifest, output_dir=out, result=train_stage(cfg))


SCENE_VAE_STEPS = 700
"""The sample recipe (model.vae_training.VaeTraining) for fewer steps: the tests' VAE (25.4 dB at
64 px, 24.1 dB at 128 px held out; ~65-75 s on 2 cores, once per session)."""


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """128 synthetic scenes at 128 px (``build_synthetic``, the sample data's seed) with their
    training manifest in ``<root>/synthetic/manifest.parquet``."""
    from data_tools.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("raw")
    build_synthetic(root / "synthetic", n=128, size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def scene_vae(scenes, tmp_path_factory) -> Path:
    """The tiny VAE trained on ``scenes`` with the sample recipe for SCENE_VAE_STEPS steps, once
    per session."""
    from model.vae_training import VaeTraining, trained_vae

    return trained_vae(scenes, tmp_path_factory.mktemp("vae"), VaeTraining(steps=SCENE_VAE_STEPS))


@pytest.fixture(scope="session")
def tiny_pipe():
    """Tiny pipeline with random (not zeroed) adaLN/final layers, so outputs are non-trivial."""
    return build_pipeline("tiny", seed=0, zero_init=False)


@pytest.fixture(scope="session")
def tiny_sampler(tiny_pipe) -> LuminaSampler:
    return LuminaSampler.from_pipeline(tiny_pipe)


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipe, tmp_path_factory):
    """The tiny pipeline saved in diffusers format."""
    return save_pipeline(tiny_pipe, tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="module")
def s3():
    """A real S3 API for the module: one loopback ``moto_server`` (starting it takes a few seconds)
    with a ``lumina`` bucket; ``AWS_ENDPOINT_URL`` and dummy credentials set until the module ends."""
    from services.s3 import DUMMY_CREDENTIALS, ensure_bucket, s3_server

    mp = pytest.MonkeyPatch()
    for key, value in {**DUMMY_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    try:
        with s3_server() as endpoint:
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            ensure_bucket("lumina")
            yield endpoint
    finally:
        mp.undo()


class CliResult:
    """What a CLI run left: exit code and captured output (like ``subprocess.CompletedProcess``)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run a typer app through the project's CLI runner (:func:`common.cli.run_cli`) in this
    process — exit code, one-line errors and all — without a subprocess's ~5 s of imports. One
    subprocess smoke test per entry point stays in test_cli.py."""
    import logging
    import sys

    from common.cli import run_cli

    def run(module: str, *args: str) -> CliResult:
        import importlib

        app = importlib.import_module(module).app
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        monkeypatch.setattr(sys, "argv", [module, *args])
        code = 0
        try:
            run_cli(app)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2-VL saved in the hub layout (the recaption tests' captioner)."""
    from components.recaption.tiny_vlm import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("vlm") / "tiny-qwen2vl", seed=0)


# --- headless Chromium (the page and report tests) ---------------------------------------------------
BROWSER_LAUNCH_TIMEOUT_MS = 30_000


def browser_unavailable(reason: str) -> None:
    """Skip with the reason, or fail where the browser tests are required (``LUMINA_REQUIRE_BROWSER=1``)."""
    if os.environ.get("LUMINA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test required (LUMINA_REQUIRE_BROWSER=1) but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Debian's ``chromium-headless-shell`` fetched into ``.cache/browser/`` on first use by
    ``tools/browser/chromium.py`` (or ``LUMINA_CHROMIUM``), launched with Playwright."""
    import importlib.util
    import sys

    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_unavailable("the playwright Python package is not installed")
    path = Path(__file__).resolve().parents[1] / "tools/browser/chromium.py"
    spec = importlib.util.spec_from_file_location("browser_chromium", path)
    helper = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = helper  # dataclasses look the module up while building the class
    spec.loader.exec_module(helper)
    try:
        found = helper.obtain()
    except helper.BrowserUnavailable as exc:
        browser_unavailable(f"no headless Chromium: {exc}")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=str(found.executable),
                env={**os.environ, **found.env},
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
                timeout=BROWSER_LAUNCH_TIMEOUT_MS,
            )
        except PlaywrightError as exc:
            first = str(exc).splitlines()[0]
            browser_unavailable(f"{found.source} {found.executable} did not start: {first}")
        yield chromium
        chromium.close()
