"""KFP wrapper for one training stage: a thin shell over :func:`train_stage`.

(No ``from __future__ import annotations``: KFP reads the real annotation objects.)

The container image (issue #7) has the project installed, so nothing is pip-installed at run
time. On a cluster the pipeline gives this task GPUs; with several GPUs in the pod the wrapper
starts ``torchrun`` over all of them.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def train_stage_op(
    manifest: Input[Dataset],
    pipeline: Output[Model],
    metrics: Output[Metrics],
    stage: str = "lowres",
    profile: str = "tiny",
    steps: int = 0,
    seed: int = 0,
    config_yaml: str = "",
    init_from: Input[Model] = None,
    images: Input[Dataset] = None,
    latents: Input[List[Dataset]] = None,
    work_root: str = "",
    run_id: str = "",
) -> str:
    """Train one stage into ``pipeline`` (diffusers folder); returns the stage's MLflow run id.
    ``work_root`` (the cache PVC on a cluster): the stage works in ``<work_root>/<run_id>/<stage>``,
    so a retried or preempted task resumes from its last complete checkpoint."""
    from model.logs import configure_logging_if_requested

    configure_logging_if_requested()  # JSON records on a cluster (LUMINA_LOG_FORMAT set on the task)
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from components.train.launch import launch_env, stage_work_dir

    work = stage_work_dir(work_root, run_id, stage)
    cmd = ["-m", "components.train", "--manifest", manifest.path, "--output-dir", str(work / stage),
           "--stage", stage, "--profile", profile, "--seed", str(seed)]  # fmt: skip
    if steps:
        cmd += ["--steps", str(steps)]
    if init_from is not None:
        cmd += ["--init-from", init_from.path]
    if images is not None:
        cmd += ["--image-root", images.path]
    if latents:  # the latent step's per-group indexes (dsl.Collected): one folder of Parquet files
        index_dir = work / "latents"
        shutil.rmtree(index_dir, ignore_errors=True)  # a retry gets this attempt's indexes only
        index_dir.mkdir()
        for part in latents:
            for file in Path(part.path).glob("*.parquet"):
                shutil.copy(file, index_dir / file.name)
        cmd += ["--latents", str(index_dir)]
    if config_yaml:
        (work / "stage.yaml").write_text(config_yaml)
        cmd += ["--config", str(work / "stage.yaml")]
    gpus = torch.cuda.device_count()
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]
        if gpus > 1
        else [sys.executable]
    )
    subprocess.run(launcher + cmd, check=True, env=launch_env(os.environ))  # its own rendezvous
    shutil.copytree(work / stage / "pipeline", pipeline.path, dirs_exist_ok=True)
    losses = [json.loads(line)["loss"] for line in (work / stage / "losses.jsonl").read_text().splitlines()]
    metrics.log_metric("final_loss", losses[-1])
    metrics.log_metric("steps", len(losses))
    run_id = json.loads((work / stage / "run.json").read_text()).get("mlflow_run_id", "")
    pipeline.metadata.update(
        {"stage": stage, "profile": profile, "final_loss": losses[-1], "mlflow_run_id": run_id}
    )
    return run_id
