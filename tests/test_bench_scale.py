"""End to end: ``python -m bench.scale --quick`` runs every data-plane step as child processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import QUICK_PARALLEL, QUICK_SIZES, STEPS

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
            "--quick",
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
    assert report["sizes"] == list(QUICK_SIZES) and report["parallel"] == list(QUICK_PARALLEL)
    runs = {(r["n"], r["parallel"]): r for r in report["runs"]}
    assert set(runs) == {(n, p) for n in QUICK_SIZES for p in QUICK_PARALLEL}
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
    for n in QUICK_SIZES:
        kept = {p: runs[(n, p)]["kept"] for p in QUICK_PARALLEL}
        assert kept[1] == kept[2], kept
        single = next(s for s in report["single"] if s["n"] == n)
        assert single["status"] == "ok" and single["images_per_s"] > 0 and single["peak_rss_mib"] > 0
        assert single["kept"] == kept[1]
    assert all(c["same_kept"] and c["same_dataset_hash"] for c in report["consistency"])
    assert {r["step"] for r in report["rss_ratio"]} == set(STEPS)
    assert all(r["ratio"] > 0 for r in report["rss_ratio"])
    assert report["per_core"] and all(c["fanout_images_per_s_per_core"] > 0 for c in report["per_core"])
