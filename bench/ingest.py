"""Ingest throughput (images/s and images/s per worker) on the synthetic sample set, and the
near-duplicate index against a full scan of the kept hashes (the peer, same process, same answers).
Run: ``python -m bench.ingest --out bench/results/ingest.json``."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from components.ingest.ingest import IngestOptions, NearDuplicateIndex, color_signature, hamming, ingest
from data_tools.synthetic import build_synthetic


def near_duplicate_lookup(kept: int, queries: int, distance: int = 4, seed: int = 0) -> dict:
    """Lookups/s of :class:`NearDuplicateIndex` and of a scan over every kept hash, on random
    64-bit hashes where half the queries are near copies of kept ones; both must agree."""
    rng = np.random.default_rng(seed)
    hashes = [int(v) for v in rng.integers(0, 2**63, kept, dtype=np.int64)]
    probes = [
        hashes[int(i)] ^ (1 << int(b))
        for i, b in zip(rng.integers(0, kept, queries // 2), rng.integers(0, 64, queries // 2), strict=True)
    ]
    probes += [int(v) for v in rng.integers(0, 2**63, queries - len(probes), dtype=np.int64)]  # fmt: skip
    sig = color_signature(Image.new("RGB", (64, 64)))  # the ingest's layout: every hash match is compared
    index = NearDuplicateIndex(distance)
    for i, h in enumerate(hashes):
        index.add(h, sig, str(i))
    start = time.perf_counter()
    found = [index.find(q, sig) for q in probes]
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    scanned = [
        next((str(i) for i, h in enumerate(hashes) if hamming(h, q) <= distance), None) for q in probes
    ]
    scan_s = time.perf_counter() - start
    assert found == scanned, "the index and the scan disagree"
    return {"kept": kept, "queries": queries, "distance": distance,
            "index_lookups_per_s": queries / index_s, "scan_lookups_per_s": queries / scan_s,
            "speedup_vs_scan": scan_s / index_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ingest.json"))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--kept-hashes", type=int, default=20_000, help="index size for the lookup bench")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        build_synthetic(src, n=args.images, size=args.size)
        for workers in (1, 2):
            start = time.perf_counter()
            # dedup off: the synthetic scenes repeat layouts, and we time decoding + hashing, not rejects
            result = ingest(
                src, Path(tmp) / f"out{workers}", IngestOptions(workers=workers, dedup_distance=-1)
            )
            elapsed = time.perf_counter() - start
            rate = (result.kept + result.rejected) / elapsed
            rows.append({"workers": workers, "images": result.kept + result.rejected, "seconds": elapsed,
                         "images_per_s": rate, "images_per_s_per_worker": rate / workers})  # fmt: skip
            print(f"workers={workers}: {rate:.0f} images/s ({rate / workers:.0f}/s per worker), "
                  f"{args.size}x{args.size} PNG")  # fmt: skip
    lookup = near_duplicate_lookup(kept=args.kept_hashes, queries=1000)
    print(f"near-duplicate lookups with {lookup['kept']} kept: index {lookup['index_lookups_per_s']:.0f}/s, "
          f"scan {lookup['scan_lookups_per_s']:.0f}/s ({lookup['speedup_vs_scan']:.0f}x)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"cpus": os.cpu_count(), "size": args.size, "rows": rows, "near_duplicate_lookup": lookup}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
