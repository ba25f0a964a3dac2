"""Does the tiny default learn the synthetic scenes? Issue #12's controls, with the real trainer.

Trains the tiny profile's first two stages (its defaults: steps, LR, caption mix; the DeepSpeed
engine) on the sample data's synthetic scenes twice, once with their captions and once with the
captions shuffled across images (a model that learns only "what these images look like"), and scores
the untrained model, each stage and the control with the project's compositional scorer on
held-out synthetic prompts (``components.evaluate``; scenes of the held-out split, which the
sample data never draws) at the evaluation resolution. Needs ``make sample-data`` (the scenes and
the trained tiny VAE).

Run: ``python -m bench.learning --out bench/results/learning.json`` (about 6–7 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from common.errors import ConfigError
from components.evaluate.compositional import CATEGORIES

DATA = Path("data/raw")
ARMS = ("captions", "shuffled")


def shuffled_manifest(manifest: Path, out: Path, seed: int = 0) -> Path:
    """``manifest`` with its ``captions`` column permuted across rows (images keep their paths)."""
    frame = pd.read_parquet(manifest)
    frame["captions"] = frame["captions"].sample(frac=1.0, random_state=seed).to_numpy()
    frame["image_path"] = [str((manifest.parent / p).resolve()) for p in frame["image_path"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    return out


def scores(model: Path, out: Path, prompts: int, size: int) -> dict[str, float]:
    """The compositional scores of ``model`` on ``prompts`` held-out synthetic prompts."""
    from components.evaluate.evaluate import EvalConfig, run_evaluation

    cfg = EvalConfig(
        suites=["synthetic"], synthetic_size=prompts, heldout=4, panels=0, height=size, width=size
    )
    metrics = run_evaluation(model, out, cfg, progress=False).metrics
    found = {k: metrics[f"synthetic_{k}"] for k in (*CATEGORIES, "overall")}
    return {**found, "val_loss": metrics["val_loss"]}


def train_arm(manifest: Path, vae: Path, work: Path, stages: list[str]) -> list[tuple[str, Path, float]]:
    """The stages in order, each from the previous one's export: (stage, export, seconds)."""
    from components.train.config import stage_config
    from components.train.trainer import train_stage

    done, init = [], None
    for stage in stages:
        extra = {"init_from": init} if init is not None else {"vae": vae}
        cfg = stage_config(stage, manifest=manifest, output_dir=work / stage, track=False, **extra)
        started = time.perf_counter()
        init = train_stage(cfg).pipeline_dir
        done.append((stage, init, time.perf_counter() - started))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/learning.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="the sample data (make sample-data)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out synthetic prompts per model")
    parser.add_argument("--size", type=int, default=128, help="evaluation resolution")
    parser.add_argument("--stages", default="lowres,highres")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from model.checkpoint import build_pipeline, save_pipeline
    from model.vae_training import find_vae

    manifest = args.data / "synthetic" / "manifest.parquet"
    vae = find_vae(args.data.parent / "vae" / "tiny", data_dir=args.data)
    if not manifest.is_file() or vae is None:
        raise ConfigError(f"no sample scenes or trained VAE under {args.data} (run `make sample-data`)")
    stages = args.stages.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        work = Path(tmp)
        untrained = save_pipeline(build_pipeline("tiny", seed=0, vae=vae), work / "untrained")
        base = scores(untrained, work / "eval-untrained", args.prompts, args.size)
        rows.append({"arm": "untrained", "stage": "-", "train_s": 0.0, **base})
        control = shuffled_manifest(manifest, work / "shuffled" / "manifest.parquet")
        sources = {"captions": manifest, "shuffled": control}
        for arm in ARMS:
            for stage, export, seconds in train_arm(sources[arm], vae, work / arm, stages):
                if arm == "shuffled" and stage != stages[-1]:
                    continue  # the control is scored once, after its last stage
                got = scores(export, work / f"eval-{arm}-{stage}", args.prompts, args.size)
                rows.append({"arm": arm, "stage": stage, "train_s": round(seconds, 1), **got})
    title = f"tiny default, held-out synthetic prompts at {args.size} px ({args.prompts} prompts)"
    table = Table(title=title)
    columns = ("arm", "stage", *CATEGORIES, "overall", "val_loss", "train_s")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    Console().print(table)
    result = {
        "benchmark": "learning",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "prompts": args.prompts,
        "size": args.size,
        "stages": stages,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
