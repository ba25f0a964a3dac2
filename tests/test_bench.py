"""The benchmarks keep running (tiny settings); their numbers are reported, not asserted."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sampler_bench_runs_and_matches_the_peer_on_plain_settings(tmp_path):
    out = tmp_path / "sampler.json"
    cmd = [sys.executable, "-m", "bench.sampler", "--profiles", "tiny", "--steps", "4", "--repeats", "1",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["setting"]: r for r in json.loads(out.read_text())["profiles"]["tiny"]["rows"]}
    assert rows["plain"]["max_pixel_diff"] < 1e-4  # same weights, same math: same images
    assert rows["plain"]["ours_calls"] * 2 == rows["plain"]["peer_calls"]  # batched CFG
    assert rows["plain"]["ours_rows"] == rows["plain"]["peer_rows"]


@pytest.mark.slow
def test_bench_rejects_a_bad_profile(tmp_path):
    cmd = [sys.executable, "-m", "bench.sampler", "--profiles", "huge", "--out", str(tmp_path / "x.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: unknown model profile 'huge'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ingest_bench_runs_and_its_index_agrees_with_the_scan(tmp_path):
    out = tmp_path / "ingest.json"
    cmd = [sys.executable, "-m", "bench.ingest", "--images", "8", "--size", "64", "--kept-hashes", "500",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # the bench asserts the index matches the scan
    report = json.loads(out.read_text())
    assert [r["workers"] for r in report["rows"]] == [1, 2] and report["rows"][0]["images"] == 8
    assert report["near_duplicate_lookup"]["kept"] == 500
