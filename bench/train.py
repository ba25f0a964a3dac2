"""Training throughput: samples/s and step time on the DeepSpeed engine, with the feature cache
(latents + text features precomputed) vs without (VAE + Gemma run every step), per profile and
ZeRO stage. Reports MFU on a GPU. Run: ``python -m bench.train --out bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common.errors import LuminaError
from components.train.trainer import ensure_distributed_env
from model.checkpoint import build_pipeline
from model.flow import flow_matching_loss
from model.profiles import get_profile
from model.text import encode_prompts
from model.vae import encode_pixels

PROMPTS = ["a red circle on the left of a blue square", "two yellow stars above a green triangle"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def transformer_flops_per_sample(n_params: int, tokens: int) -> float:
    """Forward + backward ≈ 6 · params · tokens (attention's quadratic term ignored)."""
    return 6.0 * n_params * tokens


def bench_case(
    profile: str, resolution: int, micro: int, zero: int, cached: bool, steps: int, device: str
) -> dict:
    import deepspeed

    pipe = build_pipeline(profile, seed=0, zero_init=False)
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    tr = pipe.transformer.train()
    patch = tr.config.patch_size
    bf16 = device == "cuda"
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(
        model=tr,
        optimizer=opt,
        config={
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": zero},
            "bf16": {"enabled": bf16},
            "gradient_clipping": 2.0,
            "steps_per_print": 10**9,
        },
    )
    dtype = torch.bfloat16 if bf16 else torch.float32
    pixels = torch.rand(micro, 3, resolution, resolution, device=device) * 2 - 1
    texts = [PROMPTS[i % 2] for i in range(micro)]
    latents = encode_pixels(pipe.vae, pixels)
    emb = encode_prompts(texts, pipe.tokenizer, pipe.text_encoder, device=device)

    def velocity(x, t, c, m):
        return engine(x.to(dtype), t.to(dtype), c.to(dtype), m).sample.float()

    def one_step() -> None:
        lat, feats, mask = latents, emb.embeds, emb.mask
        if not cached:
            lat = encode_pixels(pipe.vae, pixels)
            e = encode_prompts(texts, pipe.tokenizer, pipe.text_encoder, device=device)
            feats, mask = e.embeds, e.mask
        out = flow_matching_loss(
            velocity, lat, feats, mask, aux_weight=1.0, patch_size=patch, generator=torch.Generator()
        )
        engine.backward(out.loss)
        engine.step()

    one_step()  # warm-up
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        one_step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    n_params = sum(p.numel() for p in tr.parameters())
    caption_tokens = emb.embeds.shape[1]
    # the main pass on (res/16)² image tokens and the 4x-pooled auxiliary pass on (res/64)² (aux_weight 1)
    tokens = (resolution // 16) ** 2 + caption_tokens + (resolution // 64) ** 2 + caption_tokens
    row = {
        "profile": profile,
        "resolution": resolution,
        "micro_batch": micro,
        "zero_stage": zero,
        "cached": cached,
        "step_s": step_s,
        "samples_per_s": micro / step_s,
        "params": n_params,
    }
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        flops = transformer_flops_per_sample(n_params, tokens) * micro / step_s
        row["mfu"] = flops / (peak * 1e12) if peak else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    parser.add_argument(
        "--profiles",
        default="tiny,small,full" if torch.cuda.is_available() else "tiny,small",
        help="the full profile (2.6B, 256² and 1024²: the MFU figures of docs/scale.md) needs a GPU",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--zero-stages", default="0,1,2,3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    ensure_distributed_env()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
    sizes = {"tiny": [(128, 8)], "small": [(256, 4)], "full": [(256, 8), (1024, 2)]}
    rows = []
    try:
        for profile in args.profiles.split(","):
            get_profile(profile)
            for res, micro in sizes[profile]:
                for cached in (True, False):
                    rows.append(bench_case(profile, res, micro, 1, cached, args.steps, args.device))
                for zero in (int(z) for z in args.zero_stages.split(",")):
                    if zero != 1:
                        rows.append(bench_case(profile, res, micro, zero, True, args.steps, args.device))
    except LuminaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    table = Table(title=f"training throughput ({args.device})")
    for col in ("profile", "res", "micro", "ZeRO", "cache", "step s", "samples/s", "vs uncached", "MFU"):
        table.add_column(col)
    uncached = {(r["profile"]): r["step_s"] for r in rows if not r["cached"]}
    for r in rows:
        ratio = uncached[r["profile"]] / r["step_s"]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a (CPU)"
        table.add_row(r["profile"], str(r["resolution"]), str(r["micro_batch"]), str(r["zero_stage"]),
                      "yes" if r["cached"] else "no", f"{r['step_s']:.3f}", f"{r['samples_per_s']:.1f}",
                      f"{ratio:.2f}x", mfu)  # fmt: skip
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": args.device,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
