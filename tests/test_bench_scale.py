"""End to end: ``python -m bench.scale`` runs every data-plane step as child processes (two small N at
P = 2: the cost is the child processes, ~4 groups x 6 steps per run, not N; 1 vs many groups giving
the same data is tests/test_dataplane.py's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import STEPS

SIZES, PARALLEL = [200, 400], [2]  # two sizes for the RSS ratios; fan-out vs single task for the data

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    # builtin scorers: the model scorers (OCR, NSFW, ...) take ~60 ms an image and would dominate
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scale",
            "--sizes",
            ",".join(map(str, SIZES)),
            "--parallel",
            ",".join(map(str, PARALLEL)),
            "--scorers",
            "builtin",
            "--markdown",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| N | P | step |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["sizes"] == SIZES and report["parallel"] == PARALLEL
    runs = {(r["n"], r["parallel"]): r for r in report["runs"]}
    assert set(runs) == {(n, p) for n in SIZES for p in PARALLEL}
    for (n, p), run in runs.items():
        assert run["groups"] >= 4, (n, p, run["groups"])
        assert run["source"]["images"] == n
        for step in STEPS:
            row = run["steps"][step]
            assert row["status"] == "ok", (n, p, step, row.get("note"), row.get("stderr_tail"))
            assert row["images_per_s"] > 0 and row["images_per_s_per_process"] > 0, (n, p, step)
            assert row["peak_rss_mib"] > 0 and row["items"] > 0, (n, p, step)
            assert all(c["max_rss_kib"] > 0 for c in row["children"])
        # every source image went through ingest; the fan-in kept all but the planted duplicates
        assert run["steps"]["ingest"]["items"] == n
        assert 0 < run["kept"] <= n - run["source"]["exact_duplicates"]
    for n in SIZES:
        kept = {runs[(n, p)]["kept"] for p in PARALLEL}
        single = next(s for s in report["single"] if s["n"] == n)
        assert single["status"] == "ok" and single["images_per_s"] > 0 and single["peak_rss_mib"] > 0
        assert kept == {single["kept"]}  # the fanned-out plane keeps what one task keeps
    assert all(c["same_kept"] and c["same_dataset_hash"] for c in report["consistency"])
    assert {r["step"] for r in report["rss_ratio"]} == set(STEPS)
    assert all(r["ratio"] > 0 for r in report["rss_ratio"])
    assert report["per_core"] and all(c["fanout_images_per_s_per_core"] > 0 for c in report["per_core"])
