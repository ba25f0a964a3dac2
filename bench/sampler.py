"""Our sampler vs diffusers' ``Lumina2Pipeline`` (the peer) on the same weights, prompts, seed
and steps. Per setting: model calls, rows through the transformer, wall-time ratio (peer / ours)
and pixel differences. Run: ``python -m bench.sampler --out bench/results/sampler.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from common.errors import LuminaError
from model.checkpoint import build_pipeline
from model.profiles import get_profile
from model.prompts import TEMPLATES, SystemPrompt
from model.sampler import LuminaSampler, SamplerConfig, Solver
from model.sampler.calibrate import calibrate

PROMPTS = ["a red cat on the left of a blue car", "three yellow apples on a wooden table"]
# diffusers appends " <Prompt Start> " itself; this is our Template B without the marker.
PEER_SYSTEM_PROMPT = TEMPLATES[SystemPrompt.B].rstrip()
DEFAULT_SIZES = {"tiny": 64, "small": 256, "full": 1024}


@dataclass
class Setting:
    name: str
    ours: SamplerConfig
    peer_trunc_ratio: float
    peer_steps: int
    peer_normalization: bool = False
    note: str = ""


class CallCounter:
    """Counts the peer's transformer calls and batch rows with a forward pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.rows = 0
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.calls += 1
        self.rows += int(x.shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0


def guided_steps(sampler: LuminaSampler, config: SamplerConfig, latent_hw: tuple[int, int]) -> int:
    sigmas = sampler.sigmas(config, latent_hw)
    return sum(1 for i in range(config.steps) if 1.0 - float(sigmas[i]) < config.cfg_trunc)


def settings(
    sampler: LuminaSampler, steps: int, size: int, teacache: float, fdpm_steps: int
) -> list[Setting]:
    base = dict(guidance_scale=4.0, system_prompt=SystemPrompt.B, steps=steps)
    plain = SamplerConfig(cfg_trunc=1.0, renorm=0.0, **base)
    trunc = SamplerConfig(cfg_trunc=0.25, renorm=0.0, **base)
    ratio = guided_steps(sampler, trunc, (size // 8, size // 8)) / steps
    return [
        Setting("plain", plain, 1.0, steps),
        Setting("+trunc", trunc, ratio, steps),
        Setting("+trunc+renorm", SamplerConfig(cfg_trunc=0.25, renorm=1.0, **base), ratio, steps, True,
                "renorm semantics differ: ours caps the whole-sample norm (official), diffusers rescales "
                "every row to the conditional norm, so pixels differ by design"),
        Setting("+trunc+TeaCache", SamplerConfig(cfg_trunc=0.25, renorm=0.0, teacache=teacache, **base),
                ratio, steps, note="peer has no TeaCache: compared with its +trunc run"),
        Setting(f"FDPM {fdpm_steps} steps", SamplerConfig(cfg_trunc=0.25, renorm=0.0, solver=Solver.FLOW_DPM,
                **{**base, "steps": fdpm_steps}), ratio, steps,
                note=f"peer runs Euler at {steps} steps with the same truncation"),
    ]  # fmt: skip


def timed(fn: Callable[[], np.ndarray], device: str) -> tuple[float, np.ndarray]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench_profile(profile: str, size: int, steps: int, repeats: int, teacache: float, fdpm_steps: int,
                  device: str) -> dict:  # fmt: skip
    pipe = build_pipeline(profile, seed=0, zero_init=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(pipe.transformer)
    sampler = LuminaSampler.from_pipeline(pipe)
    # TeaCache coefficients fitted for these weights (as `lumina calibrate-teacache` does)
    calibration = calibrate(
        sampler, prompts=PROMPTS, height=size, width=size, config=SamplerConfig(steps=max(steps, 10))
    )
    rows = []
    for setting in settings(sampler, steps, size, teacache, fdpm_steps):
        last = {}

        def ours(setting: Setting = setting, last: dict = last) -> np.ndarray:
            last["result"] = sampler.generate(PROMPTS, height=size, width=size, seed=0, config=setting.ours,
                                              output_type="np")  # fmt: skip
            return last["result"].images

        def peer(setting: Setting = setting) -> np.ndarray:
            return pipe(
                PROMPTS, height=size, width=size, num_inference_steps=setting.peer_steps, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np",
                cfg_normalization=setting.peer_normalization, cfg_trunc_ratio=setting.peer_trunc_ratio,
                system_prompt=PEER_SYSTEM_PROMPT,
            ).images  # fmt: skip

        ours(), peer()  # warm-up
        our_times, peer_times = [], []
        for _ in range(repeats):  # alternate so drift hits both sides alike
            t, our_img = timed(ours, device)
            our_times.append(t)
            counter.reset()
            t, peer_img = timed(peer, device)
            peer_times.append(t)
        result = last["result"]
        diff = np.abs(our_img.astype(np.float64) - peer_img.astype(np.float64))
        ours_s, peer_s = statistics.median(our_times), statistics.median(peer_times)
        rows.append({
            "setting": setting.name,
            "ours_s": ours_s,
            "peer_s": peer_s,
            "speedup": peer_s / ours_s,
            "speedup_vs_peer_plain": (rows[0]["peer_s"] if rows else peer_s) / ours_s,
            "ours_calls": result.forward_calls,
            "ours_rows": result.model_rows,
            "ours_teacache_skipped": result.teacache_skipped,
            "peer_calls": counter.calls,
            "peer_rows": counter.rows,
            "max_pixel_diff": float(diff.max()),
            "mean_pixel_diff": float(diff.mean()),
            "note": setting.note,
        })  # fmt: skip
    return {"resolution": size, "steps": steps, "repeats": repeats, "teacache": calibration, "rows": rows}


def print_tables(results: dict) -> None:
    console = Console()
    for profile, res in results["profiles"].items():
        table = Table(title=f"{profile} @ {res['resolution']}px, {res['steps']} steps ({results['device']})")
        cols = (
            "setting",
            "ours s",
            "peer s",
            "speedup",
            "vs peer plain",
            "calls o/p",
            "rows o/p",
            "max |Δpx|",
        )
        for col in cols:
            table.add_column(col)
        for r in res["rows"]:
            table.add_row(r["setting"], f"{r['ours_s']:.3f}", f"{r['peer_s']:.3f}", f"{r['speedup']:.2f}x",
                          f"{r['speedup_vs_peer_plain']:.2f}x",
                          f"{r['ours_calls']}/{r['peer_calls']}", f"{r['ours_rows']}/{r['peer_rows']}",
                          f"{r['max_pixel_diff']:.2e}")  # fmt: skip
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampler.json"))
    parser.add_argument("--profiles", default="tiny,small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fdpm-steps", type=int, default=None, help="default: max(4, steps // 2)")
    parser.add_argument("--resolution", type=int, default=None, help="default: per profile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--teacache", type=float, default=0.3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    results = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "profiles": {},
        "notes": [
            "speedup = peer wall time / our wall time, medians, same process, alternating runs",
            "vs peer plain = the peer's plain (untruncated, its default) time / our time for the setting",
            "calls: transformer forward calls; rows: batch rows through the transformer",
            "pixel differences in [0, 1] units between our images and the peer's",
        ],
    }
    try:
        for profile in args.profiles.split(","):
            get_profile(profile)
            size = args.resolution or DEFAULT_SIZES[profile]
            fdpm = args.fdpm_steps or max(4, args.steps // 2)
            results["profiles"][profile] = bench_profile(
                profile, size, args.steps, args.repeats, args.teacache, fdpm, args.device
            )
    except LuminaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
