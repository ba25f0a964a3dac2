import json
import subprocess
import sys

import pytest
from PIL import Image

from model.sampler import LuminaSampler


def lumina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr


@pytest.mark.slow
def test_bad_profile_in_a_subprocess(tmp_path):  # the entry point's smoke test; the rest run in-process
    assert_one_line_error(lumina("info", "--profile", "giant"), "unknown model profile 'giant'")


def test_bad_profile(tmp_path, cli):
    assert_one_line_error(
        cli("model.cli", "build", "--out", str(tmp_path / "x"), "--profile", "giant"), "unknown model"
    )


def test_missing_weights_path(tmp_path, cli):
    proc = cli("model.cli", "sample", "--model", str(tmp_path / "missing"), "--prompt", "a cat")
    assert_one_line_error(proc, "model folder not found")


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--height", "50"], "height 50 must be a positive multiple of 16"),
        (["--solver", "rk9"], "invalid solver"),
        (["--steps", "0"], "invalid steps"),
    ],
)
def test_bad_sampling_options(tiny_folder, tmp_path, args, pattern, cli):
    proc = cli(
        "model.cli", "sample", "--model", str(tiny_folder), "--prompt", "a cat", "--out", str(tmp_path), *args
    )
    assert_one_line_error(proc, pattern)


def test_build_sample_and_calibrate(tmp_path, cli):
    folder = tmp_path / "tiny"
    proc = cli("model.cli", "build", "--out", str(folder), "--profile", "tiny", "--random-init")
    assert proc.returncode == 0, proc.stderr
    assert (folder / "model_index.json").is_file()

    out = tmp_path / "samples"
    proc = cli(
        "model.cli",
        "sample",
        "--model",
        str(folder),
        "--prompt",
        "a red cat",
        "--prompt",
        "a dog",
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "3",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (48, 32)

    proc = cli(
        "model.cli",
        "calibrate-teacache",
        "--model",
        str(folder),
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((folder / "teacache.json").read_text())
    assert len(saved["coefficients"]) == 5 and saved["pairs"] > 5
    assert LuminaSampler.load(folder).teacache_coefficients == tuple(saved["coefficients"])


@pytest.mark.parametrize(
    ("module", "args", "pattern"),
    [
        ("components.ingest.__main__", ["src", "out", "--workers", "0"], "'--workers'"),
        ("components.ingest.__main__", ["src", "out", "--bogus"], "No such option: --bogus"),
        ("components.tier.__main__", ["--no-such-flag"], "No such option"),
        ("data_tools.__main__", ["sample-data", "--tuxpaint", "-1"], "'--tuxpaint'"),
        ("pipelines.cli", ["run", "--steps"], "requires an argument"),
        ("model.cli", ["sample"], "Missing option"),
    ],
)
def test_bad_usage_is_one_line_not_a_traceback(module, args, pattern, cli):
    assert_one_line_error(cli(module, *args), pattern)


def test_json_logs_for_log_collectors(tmp_path):
    import os

    from data_tools.synthetic import build_synthetic

    build_synthetic(tmp_path / "src", n=2, size=64)
    env = {**os.environ, "LUMINA_LOG_FORMAT": "json", "TQDM_DISABLE": "1"}
    ingest = [sys.executable, "-m", "components.ingest"]
    ok = subprocess.run([*ingest, str(tmp_path / "src"), str(tmp_path / "out")],
                        capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    records = [json.loads(line) for line in ok.stderr.splitlines() if line.strip()]  # every line is JSON
    done = next(r for r in records if r["message"].startswith("ingest: kept 2"))
    assert done["level"] == "INFO" and done["logger"] == "components.ingest.merge" and "T" in done["time"]

    bad = subprocess.run([*ingest, str(tmp_path / "nope"), str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert_one_line_error(bad, "ingest source not found")
    [record] = [json.loads(line) for line in bad.stderr.splitlines() if line.startswith("{")]
    assert (
        record["level"] == "ERROR"
        and record["exit_code"] == 2
        and "ingest source not found" in record["message"]
    )

    for name, value in (("LUMINA_LOG_FORMAT", "xml"), ("LUMINA_LOG_LEVEL", "loud")):
        proc = subprocess.run([sys.executable, "-m", "model", "info"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, name: value})  # fmt: skip
        assert_one_line_error(proc, f"{name}={value!r} is not one of")


def test_component_logging_only_when_the_task_asks_for_it(monkeypatch):
    import logging

    from common.logs import configure_logging_if_requested

    root = logging.getLogger()
    before = list(root.handlers)
    monkeypatch.delenv("LUMINA_LOG_FORMAT", raising=False)
    monkeypatch.delenv("LUMINA_LOG_LEVEL", raising=False)
    configure_logging_if_requested()
    assert root.handlers == before  # the local runner's own handler is left alone
    monkeypatch.setenv("LUMINA_LOG_FORMAT", "json")
    try:
        configure_logging_if_requested()
        [handler] = root.handlers
        assert type(handler.formatter).__name__ == "JsonFormatter"
    finally:
        root.handlers[:] = before


def test_entry_points_skip_the_final_collection_but_not_the_exit_handlers(tmp_path):
    """Every CLI and pipeline step freezes the heap at exit (the interpreter's last garbage
    collection over torch's and diffusers' objects took 1.3-3 s per process): after the exit
    handlers registered later (MLflow's, which end a run) have run, and only then."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('after', gc.get_freeze_count() > 0))\n"  # runs last
        "from common.process import skip_exit_collection\n"
        "skip_exit_collection(); n = atexit._ncallbacks(); skip_exit_collection()\n"
        "atexit.register(lambda: print('before', gc.get_freeze_count() > 0))\n"  # e.g. mlflow's
        "print('registered once', atexit._ncallbacks() == n + 1)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["registered once True", "before False", "after True"], proc.stdout
