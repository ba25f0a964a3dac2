"""Ingest throughput (images/s and images/s per worker) on the synthetic sample set.
Run: ``python -m bench.ingest --out bench/results/ingest.json``."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from components.ingest.ingest import IngestOptions, ingest
from data_tools.synthetic import build_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ingest.json"))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "size": args.size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
