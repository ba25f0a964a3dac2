"""Throughput of the ``vlm`` recaption backend (:class:`components.recaption.vlm.VlmCaptioner`) on random-
weight Qwen2-VL models built offline (``tiny`` and ``small`` in ``TINY_QWEN2VL_SPECS``), per batch size.

captions/s counts images captioned per second (each image gets ``prompts_per_image`` prompts: one per
language for the four lengths and, with perspectives on (the default), one more per language);
prompts/s and generated tokens/s are reported too. Decoding is greedy with a fixed
``max_new_tokens``; a random model rarely emits its end token, so nearly every row runs to the limit.
Its text is gibberish, so the parse rate is expected to be ~0: this measures speed, not quality.
Run: ``python -m bench.recaption --out bench/results/recaption.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from components.recaption.tiny_vlm import TINY_QWEN2VL_SPECS, build_tiny_qwen2vl
from components.recaption.vlm import LANGUAGES, PROMPT_VERSION, CaptionerError, VlmCaptioner

# (width, height): mixed sizes and aspect ratios, all above the pixel cap, so every image is resized.
IMAGE_SIZES = [(320, 240), (256, 256), (200, 400), (640, 360)]


def bench_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(n)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def bench_config(
    name: str, folder: Path, images: list[Image.Image], batch_sizes: list[int], args: argparse.Namespace
) -> dict:
    path = build_tiny_qwen2vl(folder / name, seed=0, size=name)
    rows, reference = [], None
    params = None
    for batch_size in batch_sizes:
        cap = VlmCaptioner(
            path,
            batch_size=batch_size,
            max_new_tokens=args.max_new_tokens,
            max_pixels=args.max_pixels,
            device=args.device,
        )
        params = sum(p.numel() for p in cap.model.parameters())
        cap.caption(images[: min(2, len(images))])  # warm-up
        times, results = [], []
        for _ in range(args.repeats):
            cap.generate_calls, cap.batch_rows, cap.generated_tokens = 0, [], 0
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            results = cap.caption(images)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        raws = [r.raw for r in results]
        reference = reference if reference is not None else raws
        prompts = len(images) * cap.prompts_per_image
        rows.append({
            "batch_size": batch_size,
            "images": len(images),
            "prompts": prompts,
            "seconds": seconds,
            "captions_per_s": len(images) / seconds,
            "prompts_per_s": prompts / seconds,
            "generated_tokens": cap.generated_tokens,
            "tokens_per_s": cap.generated_tokens / seconds,
            "generate_calls": cap.generate_calls,
            "images_with_parsed_captions": sum(bool(r.captions) for r in results),
            "same_output_as_first_batch_size": raws == reference,
        })  # fmt: skip
    spec = TINY_QWEN2VL_SPECS[name]
    return {
        "parameters": params,
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
        "rows": rows,
    }


def print_tables(results: dict) -> None:
    console = Console()
    for name, res in results["configs"].items():
        params = f"{res['parameters'] / 1e6:.1f}M params"
        where = f"{results['device']}, {results['torch_threads']} threads"
        title = f"vlm captioner, {name} Qwen2-VL ({params}, {where})"
        table = Table(title=f"{title}, max_new_tokens={results['max_new_tokens']}")
        for col in ("batch", "s", "captions/s", "prompts/s", "tokens/s", "calls", "parsed", "same as bs1"):
            table.add_column(col)
        for r in res["rows"]:
            table.add_row(str(r["batch_size"]), f"{r['seconds']:.2f}", f"{r['captions_per_s']:.2f}",
                          f"{r['prompts_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", str(r["generate_calls"]),
                          f"{r['images_with_parsed_captions']}/{r['images']}",
                          str(r["same_output_as_first_batch_size"]))  # fmt: skip
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/recaption.json"))
    parser.add_argument("--configs", default="tiny,small", help=f"from {', '.join(TINY_QWEN2VL_SPECS)}")
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, default=64 * 28 * 28, help="default: <= 64 visual tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core box, 2 threads stall under load)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        unknown = [c for c in configs if c not in TINY_QWEN2VL_SPECS]
        if unknown or not configs:
            raise CaptionerError(f"unknown config {unknown[0] if unknown else ''!r} (choose from "
                                 f"{', '.join(TINY_QWEN2VL_SPECS)})")  # fmt: skip
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        if not batch_sizes or min(batch_sizes) < 1 or args.images < 1 or args.repeats < 1:
            raise CaptionerError("--batch-sizes, --images and --repeats must be positive")
    except (CaptionerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu x{os.cpu_count()}",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "prompt_version": PROMPT_VERSION,
        "languages": list(LANGUAGES),
        "max_new_tokens": args.max_new_tokens,
        "max_pixels": args.max_pixels,
        "image_sizes": [list(s) for s in IMAGE_SIZES],
        "repeats": args.repeats,
        "configs": {},
        "notes": [
            "captions/s: images per second, each captioned in every language (one prompt per language)",
            "random weights: text is gibberish, so parsed captions are expected to be 0; speed only",
            "greedy decoding: outputs should not depend on the batch size (same_output_as_first_batch_size)",
            "seconds: median wall time over repeats of caption(images), after a warm-up call",
            "CPU numbers on a shared machine are noisy; compare rows of one run, not across runs",
        ],
    }
    images = bench_images(args.images)
    with tempfile.TemporaryDirectory(prefix="bench-recaption-") as tmp:
        for name in configs:
            results["configs"][name] = bench_config(name, Path(tmp), images, batch_sizes, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_tables(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
