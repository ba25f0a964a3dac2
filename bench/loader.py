"""Memory and throughput of the streaming training loader as the dataset grows.

For each N it writes N synthetic latents (16 x 16 x 16 bf16, three aspect buckets) as index groups of
2,000 samples, the layout :mod:`components.latents` writes, then in a fresh child process per
(N, mode) reads one epoch of micro batches:

- ``stream``: :class:`components.train.loader.StageStream` (2 worker processes, units of 256);
- ``in-memory``: the peer, what training did before the loader: every latent read into one dict
  first, then micro batches drawn from it.

Each child reports its peak RSS (``ru_maxrss`` of itself plus the largest of its worker processes)
and samples/s. Reported: per N and mode the figures, and per mode the peak RSS at the largest N over
the smallest (the stream should stay flat, < 1.3x; the in-memory peer grows with N).

Run: ``python -m bench.loader --out bench/results/loader.json`` (``--quick``: N in 1000, 4000).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SIZES = (2000, 8000, 32000)
QUICK_SIZES = (1000, 4000)
GROUP = 2000
MICRO = 8


def write_dataset(root: Path, n: int) -> Path:
    """N latents in groups of :data:`GROUP` (safetensors + index Parquet each)."""
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    sizes = [(128, 128), (128, 64), (64, 128)]
    for g in range(0, n, GROUP):
        tensors, rows = {}, []
        file = str(root / f"g{g // GROUP:04d}.safetensors")
        for i in range(g, min(n, g + GROUP)):
            h, w = sizes[i % 3]
            key = f"im{i:07d}"
            tensors[key] = torch.randn(16, 2 * h // 8, 2 * w // 8).to(torch.bfloat16)
            caps = json.dumps([{"granularity": "short", "language": "en", "text": f"image {i}"}])
            rows.append({"id": key, "file": file, "key": key, "height": 2 * h, "width": 2 * w,
                         "resolution": 256, "vae_fingerprint": "bench", "captions": caps,
                         "domain": "synthetic"})  # fmt: skip
        save_file(tensors, file)
        pd.DataFrame(rows).to_parquet(root / f"g{g // GROUP:04d}.index.parquet")
    return root


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def run_child(mode: str, root: str, n: int) -> dict:
    """One epoch's micro batches in this process (the child side)."""
    import torch

    from components.latents.cache import LatentStore, read_latent_index
    from components.train.loader import StageFilter, StageStream

    start = time.perf_counter()
    samples = 0
    if mode == "stream":
        stream = StageStream(root, StageFilter(256, "bench"), micro_batch=MICRO, seed=0, rank=0, world=1,
                             workers=2, unit_size=256)  # fmt: skip
        while stream.position.epoch == 0:
            samples += len(stream.next().records)
        stream.close()
    else:
        index = read_latent_index(root)
        store = LatentStore(index)
        latents = {key: store[key] for key in store}  # the whole dataset in memory
        ids = list(latents)
        for i in range(0, len(ids) - MICRO + 1, MICRO):
            batch = [latents[k] for k in ids[i : i + MICRO] if latents[k].shape == latents[ids[i]].shape]
            samples += len(torch.stack(batch))
    elapsed = time.perf_counter() - start
    return {"mode": mode, "n": n, "samples": samples, "seconds": elapsed,
            "samples_per_s": samples / elapsed, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/loader.json"))
    parser.add_argument("--sizes", default=None, help="comma-separated N")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, root, n = args.child
        print(json.dumps(run_child(mode, root, int(n))))
        return
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    )
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
            write_dataset(Path(tmp), n)
            for mode in ("stream", "in-memory"):
                cmd = [sys.executable, "-m", "bench.loader", "--child", mode, tmp, str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"N={n:>6} {mode:>9}: {r['samples_per_s']:8.0f} samples/s,"
                    f" peak RSS {r['peak_rss_mib']:7.0f} MiB"
                )
    growth = {}
    for mode in ("stream", "in-memory"):
        mine = [r for r in rows if r["mode"] == mode]
        growth[mode] = mine[-1]["peak_rss_mib"] / mine[0]["peak_rss_mib"]
        print(f"{mode}: peak RSS at N={mine[-1]['n']} / N={mine[0]['n']} = {growth[mode]:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "micro_batch": MICRO, "rows": rows, "rss_growth": growth}
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
