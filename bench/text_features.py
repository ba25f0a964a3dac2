"""Caption features: encode online with Gemma every step, or read them from a precomputed cache?

On the ``small`` profile, for micro batches of the lowres stage's size, measures
(1) encoding captions online with the Gemma2 text encoder (``model.text.encode_prompts``),
(2) reading the same captions' features back by key from a safetensors cache file (bf16 and fp32,
    valid tokens only, padded into a batch as ``data.pad_features`` does), and the in-memory
    dict the trainer uses today,
(3) the transformer's training step (forward + backward + AdamW, plain PyTorch, no DeepSpeed) on
    random latents at the lowres resolution for the same batch,
and reports the ratio text-encode time / train-step time, the cache's bytes per caption variant and
an extrapolation of cache storage to the full profile (110M images x 8 caption variants x 256
tokens x 2304 dims x bf16). Run: ``python -m bench.text_features --out bench/results/text_features.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file

from components.train.config import STAGE_DEFAULTS, Stage, stage_config
from components.train.data import pad_features
from model.checkpoint import build_pipeline
from model.flow import flow_matching_loss, image_seq_len
from model.profiles import LATENT_CHANNELS, VAE_DOWNSAMPLE, get_profile
from model.prompts import SystemPrompt, apply_system_prompt
from model.text import MAX_TEXT_TOKENS, encode_prompts, tokenizer_corpus

FULL_IMAGES = 110_000_000
CAPTION_VARIANTS = 8
BF16 = 2


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions of mixed length (tag / short / medium / detailed), system prompt A."""
    rng = random.Random(seed)
    corpus = [s for s in tokenizer_corpus(seed=seed) if s.startswith("A ")]
    out = []
    for i in range(n):
        k = (1, 1, 2, 4)[i % 4]
        text = " ".join(rng.sample(corpus, k)) + f" #{i}"
        out.append(apply_system_prompt(text, SystemPrompt.A))
    return out


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/text_features.json"))
    parser.add_argument("--profile", default="small")
    parser.add_argument("--captions", type=int, default=512, help="captions in the cache file")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    get_profile(args.profile)
    stage = stage_config(Stage.LOWRES, args.profile, manifest=Path("-"), output_dir=Path("-"))
    micro, res = stage.micro_batch, stage.resolution
    pipe = build_pipeline(args.profile, seed=0)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    texts = captions(args.captions)
    rng = random.Random(1)
    batches = [rng.sample(texts, micro) for _ in range(args.reps + 1)]
    it = iter(range(10**9))

    # (1) online: one micro batch of captions through Gemma per training micro step
    big = [rng.sample(texts, 32) for _ in range(args.reps + 1)]

    def online(pool: list[list[str]] = batches) -> None:
        encode_prompts(pool[next(it) % len(pool)], tok, enc)

    online_s = timed(online, args.reps)
    online32_s = timed(lambda: online(big), max(3, args.reps // 3))

    # features of every caption (valid tokens only), written as the cache would hold them
    feats: dict[str, torch.Tensor] = {}
    for i in range(0, len(texts), 32):
        emb = encode_prompts(texts[i : i + 32], tok, enc)
        for t, e, m in zip(texts[i : i + 32], emb.embeds, emb.mask, strict=True):
            feats[t] = e[: int(m.sum())].float().clone()
    keys = {t: f"c{i:06d}" for i, t in enumerate(texts)}
    tokens = [f.shape[0] for f in feats.values()]
    dim = next(iter(feats.values())).shape[1]
    rows: list[dict] = [
        {"method": "online Gemma encode", "batch": micro, "s_per_batch": online_s},
        {"method": "online Gemma encode", "batch": 32, "s_per_batch": online32_s},
    ]
    file_bytes = {}
    with tempfile.TemporaryDirectory(prefix="textfeat-") as tmp:
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            path = Path(tmp) / f"text-{name}.safetensors"
            save_file({keys[t]: f.to(dtype).contiguous() for t, f in feats.items()}, str(path))
            file_bytes[name] = path.stat().st_size
            handle = safe_open(str(path), framework="pt")

            def read(handle=handle) -> None:
                batch = batches[next(it) % len(batches)]
                pad_features([handle.get_tensor(keys[t]).float() for t in batch])

            rows.append({"method": f"read cache file ({name})", "batch": micro,
                         "s_per_batch": timed(read, args.reps * 20)})  # fmt: skip

    def in_memory() -> None:
        pad_features([feats[t] for t in batches[next(it) % len(batches)]])

    rows.append(
        {"method": "in-memory dict (today)", "batch": micro, "s_per_batch": timed(in_memory, args.reps * 20)}
    )

    # (3) the transformer's training step on the same batch at the stage's resolution
    tr = pipe.transformer.train()
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-4)
    side = res // VAE_DOWNSAMPLE
    latents = torch.randn(micro, LATENT_CHANNELS, side, side)
    cap, mask = pad_features([feats[t] for t in batches[0]])

    def velocity(x, t, c, m):
        return tr(x, t, c, m).sample

    def train_step() -> None:
        out = flow_matching_loss(
            velocity, latents, cap, mask, patch_size=tr.config.patch_size,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = timed(train_step, max(3, args.reps // 2))
    rows.append({"method": "transformer train step", "batch": micro, "s_per_batch": step_s})
    for r in rows:
        r["captions_per_s"] = r["batch"] / r["s_per_batch"]
        r["s_per_sample"] = r["s_per_batch"] / r["batch"]
        r["vs_train_step"] = (r["s_per_batch"] / r["batch"]) / (step_s / micro)

    # storage: bytes per caption variant (tokens x dim x 2 bytes, bf16)
    mean_tokens = statistics.mean(tokens)
    full = get_profile("full")
    full_dim = full.text_encoder.hidden_size
    per_caption_full = MAX_TEXT_TOKENS * full_dim * BF16
    total_full = FULL_IMAGES * CAPTION_VARIANTS * per_caption_full
    # analytic FLOPs on the full profile (forward 2·N·T, training step 6·N·T; attention ignored)
    gemma_params = 2.0e9  # Gemma-2-2B without its 0.59B-parameter embedding table
    dit_params = 2.6e9
    full_ratio = {}
    for stage_name, stage_res in (("lowres", 256), ("highres", 1024)):
        side = stage_res // VAE_DOWNSAMPLE
        img_tokens = image_seq_len(side, side, full.transformer.patch_size)
        full_ratio[stage_name] = (2 * gemma_params * MAX_TEXT_TOKENS) / (
            6 * dit_params * (img_tokens + MAX_TEXT_TOKENS)
        )
    result = {
        "profile": args.profile,
        "resolution": res,
        "micro_batch": micro,
        "global_batch": STAGE_DEFAULTS[args.profile][Stage.LOWRES]["global_batch"],
        "threads": args.threads,
        "rows": rows,
        "text_encode_over_train_step": online_s / step_s,
        "cache_read_bf16_over_train_step": next(r for r in rows if "bf16" in r["method"])["s_per_batch"]
        / step_s,
        "caption_tokens_mean": mean_tokens,
        "caption_tokens_max": max(tokens),
        "feature_dim": dim,
        "bytes_per_caption_bf16_measured_mean": mean_tokens * dim * BF16,
        "bytes_per_caption_bf16_padded_256": MAX_TEXT_TOKENS * dim * BF16,
        "cache_file_bytes": {k: v for k, v in file_bytes.items()},
        "cache_file_captions": len(texts),
        "full_profile": {
            "images": FULL_IMAGES,
            "caption_variants": CAPTION_VARIANTS,
            "tokens": MAX_TEXT_TOKENS,
            "dim": full_dim,
            "bytes_per_caption_bf16": per_caption_full,
            "total_bytes_bf16": total_full,
            "total_TB": total_full / 1e12,
            "total_PiB": total_full / 2**50,
            "total_TB_at_measured_mean_tokens": FULL_IMAGES
            * CAPTION_VARIANTS
            * mean_tokens
            * full_dim
            * BF16
            / 1e12,
            "note": "256 tokens is the cap; storing valid tokens only scales with real caption length",
            "analytic_text_encode_over_train_step_flops": full_ratio,
        },
        "wall_s": time.perf_counter() - t0,
        "device": "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    table = Table(title=f"caption features, {args.profile} profile, {res}px, micro batch {micro} (CPU)")
    for col in ("method", "batch", "s / batch", "captions/s", "s / sample", "x train step"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], str(r["batch"]), f"{r['s_per_batch']:.5f}", f"{r['captions_per_s']:.1f}",
                      f"{r['s_per_sample']:.5f}", f"{r['vs_train_step']:.3f}")  # fmt: skip
    console = Console(width=120)
    console.print(table)
    console.print(
        f"text encode / train step: {result['text_encode_over_train_step']:.3f}; "
        f"bf16 cache: {result['bytes_per_caption_bf16_measured_mean'] / 1e3:.1f} kB/caption here "
        f"({mean_tokens:.0f} tokens x {dim}); full profile: {per_caption_full / 2**20:.2f} MiB/caption, "
        f"{result['full_profile']['total_TB']:.0f} TB for {FULL_IMAGES:,} images x {CAPTION_VARIANTS} "
        "variants"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
