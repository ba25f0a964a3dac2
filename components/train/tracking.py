"""A stage's MLflow run: which run (continued or new), its params and tags, per-step metrics with
this rank's throughput, and the artifacts logged when the stage ends."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch

from common.errors import error_summary
from components.tracking import MlflowTracker, default_tracking_uri, file_sha256, git_sha
from components.train.config import TrainConfig
from components.train.samples import sample_grid

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"


def start_tracking(
    cfg: TrainConfig, tracker: MlflowTracker | None, rank: int, start: int, world: int
) -> MlflowTracker | None:
    """The stage's tracker: the one passed in, else (``cfg.track``, rank 0) the stage's run from
    :func:`stage_tracker`; a new run gets the config as params; every run the stage's tags."""
    continued = False
    if tracker is None and cfg.track and rank == 0:
        tracker, continued = stage_tracker(cfg, start)
    if tracker is not None:
        if not continued:  # a continued run has its params (MLflow params cannot change)
            tracker.log_params(cfg.model_dump(mode="json"))
        tracker.set_tags(
            {
                "stage": str(cfg.stage),
                "profile": cfg.profile,
                "git_sha": git_sha(),
                # the unified stage of the pipeline has no manifest file: its rows are index rows
                "dataset_sha256": file_sha256(cfg.manifest)
                if cfg.manifest.is_file()
                else "latent index only",
                "init_from": str(cfg.init_from or "scratch"),
                "world_size": str(world),
            }
        )
    return tracker


def stage_tracker(cfg: TrainConfig, start: int) -> tuple[MlflowTracker, bool]:
    """The stage's MLflow run and whether it continues an earlier one: a stage resumed from a
    checkpoint continues the run it started (its id kept in ``output_dir/mlflow_run.json``, the
    run set RUNNING again, tagged ``resumed_at_step``); a stage that starts over (no complete
    checkpoint) or whose run is gone gets a new run, the earlier one ended ``KILLED`` and linked
    by the ``previous_run`` tag."""
    uri, path = default_tracking_uri(cfg.output_dir), cfg.output_dir / RUN_FILE
    saved = json.loads(path.read_text()).get("run_id") if path.is_file() else None
    if saved and start > 0:
        try:
            tracker = MlflowTracker.reopen(uri, saved)
        except Exception as exc:  # MlflowException: the run is not in this store
            log.warning(
                "cannot continue MLflow run %s (%s); starting a new one", saved, error_summary(exc, 200)
            )
        else:
            tracker.set_tags({"resumed_at_step": str(start)})
            log.info("continuing MLflow run %s at step %d", saved, start)
            return tracker, True
    tracker = MlflowTracker(uri, run_name=f"{cfg.stage}-{cfg.profile}")
    if saved:
        tracker.set_tags({"previous_run": saved})
        with contextlib.suppress(Exception):  # the old run may be in another store
            if tracker.client.get_run(saved).info.status == "RUNNING":
                tracker.client.set_terminated(saved, status="KILLED")
    path.write_text(json.dumps({"run_id": tracker.run_id}))
    return tracker, False


class Throughput:
    """Images and tokens (latent patches and caption tokens) this rank trained on since the last
    :meth:`reset`."""

    def __init__(self, patch_size: int):
        self.patch = patch_size
        self.reset()

    def reset(self) -> None:
        self.tick, self.images, self.tokens = time.perf_counter(), 0, 0

    def count(self, latents: torch.Tensor, mask: torch.Tensor) -> None:
        patch = self.patch
        self.images += latents.shape[0]
        self.tokens += latents.shape[0] * (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        self.tokens += int(mask.sum())


def log_step(
    tracker: MlflowTracker, engine, lr: float, meter: Throughput, done: int, loss: float, aux: float
) -> None:
    """Step ``done``'s metrics (``lr``: the LR that step used); the throughput since the last logged
    step, then the meter restarts."""
    elapsed = time.perf_counter() - meter.tick
    tracker.log_metrics(
        {
            "loss": loss,
            "aux_loss": aux,
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "lr": lr,
            # this rank's throughput (multiply by the world size for the job's)
            "images_per_s": meter.images / max(elapsed, 1e-9),
            "tokens_per_s": meter.tokens / max(elapsed, 1e-9),
        },
        step=done,
    )
    meter.reset()


def write_artifacts(cfg: TrainConfig, pipe, losses: list[float]) -> list[Path]:
    """Config, loss curve and a sample grid on fixed prompts and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = cfg.output_dir
    config_path = out / "config.json"
    config_path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    curve = out / "loss_curve.png"
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="loss", title=f"{cfg.stage} ({cfg.profile})")
    fig.tight_layout()
    fig.savefig(curve)
    plt.close(fig)
    grid_path = sample_grid(cfg, pipe, out / "samples.png")
    return [config_path, curve, grid_path, out / "losses.jsonl"]


def finish_tracking(tracker: MlflowTracker | None, artifacts: list[Path]) -> None:
    """Log the stage's artifacts and end its run (nothing untracked)."""
    if tracker is None:
        return
    for path in artifacts:
        tracker.log_artifact(path)
    tracker.finish()
