"""The HTTP sampler server under load: requests/s and p50/p95 latency at several client
concurrencies, with micro-batching on and off, against a real ``python -m serving`` process on
loopback serving the tiny model. Prints ratios (batched vs unbatched), never absolute targets.

Run: ``python -m bench.serve --out bench/results/serve.json`` (about 1-2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import requests
import torch
import yaml
from rich.console import Console
from rich.table import Table

from services.process import free_port, http_answers, running

MODES = ("unbatched", "batched")
CALLS = "lumina_generate_calls_total"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def run_clients(base: str, concurrency: int, total: int, body: dict) -> tuple[list[float], list[str], float]:
    """``concurrency`` closed-loop clients sending ``total`` requests in all (distinct prompts and
    seeds); returns (latencies of successes, failures, wall seconds)."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            r = session.post(
                f"{base}/v1/generate",
                json={**body, "prompt": f"{body['prompt']} #{i}", "seed": i},
                timeout=300,
            )
            elapsed = time.perf_counter() - start
            with lock:
                if r.status_code == 200:
                    latencies.append(elapsed)
                else:
                    failures.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures, time.perf_counter() - start


def start_server(stack: ExitStack, folder: Path, work: Path, batched: bool, args: argparse.Namespace) -> str:
    """Start ``python -m serving`` for one mode; return its base URL once it is ready."""
    defaults = {
        "steps": args.steps,
        "height": args.size,
        "width": args.size,
        "max_side": max(args.size, 128),
        "max_steps": max(args.steps, 50),
        "merge_rows": args.merge_rows,
        "queue_size": 4 * max(args.concurrency),
        "batch_window_ms": args.window_ms,
        "micro_batch": batched,
    }
    name = "batched" if batched else "unbatched"
    defaults_file = work / f"{name}.yaml"
    defaults_file.write_text(yaml.safe_dump(defaults))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--model", str(folder),
        "--defaults-file", str(defaults_file), "--threads", str(args.threads), "--log-level", "warning",
    ]  # fmt: skip
    stack.enter_context(
        running(cmd, http_answers(f"{base}/healthz"), log_file=work / f"{name}.log", timeout=180)
    )
    deadline = time.time() + 180
    while requests.get(f"{base}/readyz", timeout=5).status_code != 200:
        if time.time() > deadline:
            raise TimeoutError(f"{name} server did not become ready")
        time.sleep(0.2)
    return base


def measure(folder: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """Both servers up at once (an idle one costs nothing); per concurrency the modes alternate for
    ``repeats`` rounds so drift in the machine's load hits both alike."""
    body = {"prompt": "a red cat on the left of a blue car", "response_format": "png"}
    rows = []
    with ExitStack() as stack:
        bases = {name: start_server(stack, folder, work, name == "batched", args) for name in MODES}
        for base in bases.values():  # warm-up: every batch shape
            run_clients(base, max(args.concurrency), 2 * max(args.concurrency), body)
        for concurrency in args.concurrency:
            total = max(args.min_requests, args.requests_per_client * concurrency)
            pooled = {name: {"lat": [], "fail": [], "wall": [], "calls": 0.0} for name in MODES}
            for _ in range(args.repeats):
                for name, base in bases.items():
                    before = requests.get(f"{base}/metrics", timeout=10).text
                    lat, fail, wall = run_clients(base, concurrency, total, body)
                    after = requests.get(f"{base}/metrics", timeout=10).text
                    p = pooled[name]
                    p["lat"] += lat
                    p["fail"] += fail
                    p["wall"].append(wall)
                    p["calls"] += metric(after, CALLS) - metric(before, CALLS)
            for name in MODES:
                p = pooled[name]
                done = len(p["lat"])
                row = {
                    "mode": name,
                    "concurrency": concurrency,
                    "requests": total * args.repeats,
                    "failures": len(p["fail"]),
                    "failure_examples": p["fail"][:3],
                    "requests_per_s": statistics.median(total / w for w in p["wall"]),
                    "p50_s": percentile(p["lat"], 50) if done else float("nan"),
                    "p95_s": percentile(p["lat"], 95) if done else float("nan"),
                    "mean_s": statistics.fmean(p["lat"]) if done else float("nan"),
                    "sampler_calls": p["calls"],
                    "requests_per_call": done / p["calls"] if p["calls"] else float("nan"),
                }
                rows.append(row)
                print(
                    f"{name:9s} c={concurrency:2d}: {row['requests_per_s']:.1f} req/s, "
                    f"p50 {row['p50_s'] * 1000:.0f} ms, p95 {row['p95_s'] * 1000:.0f} ms, "
                    f"{row['requests_per_call']:.1f} requests/sampler call",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: build tiny)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--min-requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per concurrency")
    parser.add_argument("--merge-rows", type=int, default=16, help="most images per merged sampler call")
    parser.add_argument("--window-ms", type=float, default=5.0, help="batching window")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in the server (1: stable on shared CPUs)"
    )
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        folder = args.model
        if folder is None:
            from model.checkpoint import build_pipeline, save_pipeline

            folder = save_pipeline(build_pipeline("tiny", seed=0, zero_init=False), work / "tiny")
        rows = measure(folder, work, args)

    by = {(r["mode"], r["concurrency"]): r for r in rows}
    ratios = []
    for c in args.concurrency:
        b, u = by[("batched", c)], by[("unbatched", c)]
        ratios.append({
            "concurrency": c,
            "throughput_batched_over_unbatched": b["requests_per_s"] / u["requests_per_s"],
            "p50_unbatched_over_batched": u["p50_s"] / b["p50_s"],
            "p95_unbatched_over_batched": u["p95_s"] / b["p95_s"],
            "requests_per_call_batched": b["requests_per_call"],
        })  # fmt: skip
    results = {
        "device": f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "model": str(args.model or "tiny (random weights, built here)"),
        "size": args.size,
        "steps": args.steps,
        "server_torch_threads": args.threads,
        "merge_rows": args.merge_rows,
        "batch_window_ms": args.window_ms,
        "repeats": args.repeats,
        "rows": rows,
        "ratios": ratios,
        "bench_seconds": time.perf_counter() - started,
        "notes": [
            "closed-loop clients on loopback; one python -m serving process per mode, both warmed up; "
            "per concurrency the modes alternate for `repeats` rounds (req/s: median round; "
            "latency percentiles: all rounds pooled)",
            "unbatched: micro_batch false (one sampler call per request); batched: compatible queued "
            "requests share one sampler call with per-request seeds",
            "ratios > 1 favour batching; absolute numbers depend on the machine and its other load",
        ],
    }
    table = Table(title=f"serving tiny @ {args.size}px, {args.steps} steps, batched vs unbatched")
    for col in ("concurrency", "req/s ratio", "p50 ratio (u/b)", "p95 ratio (u/b)", "requests/call"):
        table.add_column(col)
    for r in ratios:
        table.add_row(
            str(r["concurrency"]),
            f"{r['throughput_batched_over_unbatched']:.2f}x",
            f"{r['p50_unbatched_over_batched']:.2f}x",
            f"{r['p95_unbatched_over_batched']:.2f}x",
            f"{r['requests_per_call_batched']:.1f}",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} in {results['bench_seconds']:.0f} s")
    if any(r["failures"] for r in rows):
        print("error: some requests failed; see failure_examples in the JSON", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
