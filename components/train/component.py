"""KFP wrapper for one training stage: a thin shell over :func:`train_stage`.

(No ``from __future__ import annotations``: KFP reads the real annotation objects.)

The container image (issue #7) has the project installed, so nothing is pip-installed at run
time. ``launcher``:

- ``local`` (the embedded default, and a cluster compiled with ``train_launcher: pod``): the stage
  runs in this task's pod, with ``torchrun`` over all its GPUs when it has several;
- ``trainjob`` (a cluster's default): the task creates a Kubeflow Trainer ``TrainJob`` of ``nodes`` x
  ``gpus_per_node`` for the stage (``trainjob_json``: the cluster settings the pipeline was compiled
  with), follows it and fails with the job's own message when it fails. Inputs are staged on the
  shared cache volume, where the job's pods find them and write the stage's outputs.
"""

from typing import List

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import lumina_component


@lumina_component
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
    launcher: str = "local",
    nodes: int = 1,
    gpus_per_node: int = 1,
    trainjob_json: str = "",
    base_model: str = "",
    heldout: Input[Dataset] = None,
    vae: str = "",
    enabled: bool = True,
) -> str:
    """Train one stage into ``pipeline`` (diffusers folder); returns the stage's MLflow run id.
    ``base_model`` (first stage only: without ``init_from``): start from released or registered
    weights (hub id, folder, ``s3://`` or ``models:/``) instead of a random model.
    ``vae`` (first stage only, not with ``base_model``): a trained VAE folder for the random model.
    ``work_root`` (the cache PVC on a cluster): the stage works in ``<work_root>/<run_id>/<stage>``,
    so a retried or preempted task resumes from its last complete checkpoint.
    ``heldout``: the tier step's held-out manifest (``heldout.parquet`` or the tier folder): the
    stage's ``val_loss`` on it is logged and reported in ``metrics``.
    ``enabled=False`` (an optional stage turned off, e.g. ``unified``): nothing is trained, and
    ``pipeline`` is the ``init_from`` model unchanged; returns ""."""
    from common.process import start_step

    start_step()  # JSON records on a cluster (LUMINA_LOG_FORMAT set on the task), a quick exit
    import json
    import os
    import shutil
    import sys
    from pathlib import Path

    from components.train.launch import (
        base_model_source,
        launch_env,
        local_gpu_count,
        run_stage_process,
        shared_copy,
        shared_init,
        stage_work,
    )

    if not enabled:
        if init_from is None:
            from common.errors import ConfigError

            raise ConfigError(f"stage {stage} is turned off but has no init_from model to pass on")
        shutil.copytree(init_from.path, pipeline.path, dirs_exist_ok=True)
        pipeline.metadata.update({**init_from.metadata, "skipped_stage": stage})
        metrics.log_metric("steps", 0)
        print(f"stage {stage} is turned off: passing on the previous stage's model", file=sys.stderr)
        return ""
    with stage_work(work_root, run_id, stage) as work:  # a temporary one is removed on success
        on_trainjob = launcher == "trainjob"
        if launcher not in ("local", "trainjob"):
            raise ValueError(f"launcher must be local or trainjob (got {launcher!r})")
        inputs = {"manifest": manifest.path, "init_from": init_from.path if init_from is not None else None,
                  "image_root": images.path if images is not None else None}  # fmt: skip
        if base_model and vae:
            from common.errors import ConfigError

            raise ConfigError("base_model and vae exclude each other (the base model brings its own VAE)")
        if init_from is None and base_model:
            inputs["init_from"] = base_model_source(base_model, work)
        if on_trainjob:  # the job's pods see the shared volume, not this pod's downloaded artifacts
            inputs["manifest"] = str(shared_copy(manifest.path, work, "manifest"))
            if init_from is not None:
                inputs["init_from"] = str(shared_init(init_from.path, init_from.metadata, work))
            if images is not None:
                inputs["image_root"] = str(shared_copy(images.path, work, "images"))
        out = work / "output"  # checkpoints/, pipeline/, losses.jsonl (inputs/ and latents/ beside it)
        cmd = ["--manifest", inputs["manifest"], "--output-dir", str(out),
               "--stage", stage, "--profile", profile, "--seed", str(seed)]  # fmt: skip
        if steps:
            cmd += ["--steps", str(steps)]
        if inputs["init_from"]:
            cmd += ["--init-from", inputs["init_from"]]
        if inputs["image_root"]:
            cmd += ["--image-root", inputs["image_root"]]
        if latents:  # the latent step's per-group indexes (dsl.Collected): one folder of Parquet files
            index_dir = work / "latents"
            shutil.rmtree(index_dir, ignore_errors=True)  # a retry gets this attempt's indexes only
            index_dir.mkdir()
            for part in latents:
                for file in Path(part.path).glob("*.parquet"):
                    shutil.copy(file, index_dir / file.name)
            cmd += ["--latents", str(index_dir)]
        held = Path(heldout.path) if heldout is not None else None
        held = held / "heldout.parquet" if held is not None and held.is_dir() else held
        if held is not None and not held.is_file():  # e.g. tiers cached from before the split
            print(f"no held-out manifest at {held}: the stage reports no val_loss", file=sys.stderr)
        elif held is not None:  # the held-out manifest goes in through the stage config
            import yaml

            held = shared_copy(held, work, "heldout.parquet") if on_trainjob else held
            config_yaml = yaml.safe_dump({**(yaml.safe_load(config_yaml or "") or {}), "heldout": str(held)})
        if vae and init_from is None:  # later stages keep the VAE of the pipeline they start from
            import yaml

            stage_yaml = yaml.safe_load(config_yaml) if config_yaml else {}
            vae_dir = shared_copy(vae, work, "vae") if on_trainjob else Path(vae)
            config_yaml = yaml.safe_dump({**(stage_yaml or {}), "vae": str(vae_dir)}, sort_keys=False)
        if config_yaml:
            (work / "stage.yaml").write_text(config_yaml)
            cmd += ["--config", str(work / "stage.yaml")]
        if on_trainjob:
            from components.train.trainjob import run_stage_trainjob

            settings = json.loads(trainjob_json or "{}")
            run_stage_trainjob(
                cmd, settings, run_id=run_id, stage=stage, nodes=nodes, gpus_per_node=gpus_per_node
            )
        else:
            gpus = local_gpu_count()
            launcher_cmd = (
                [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]
                if gpus > 1
                else [sys.executable]
            )
            stage_cmd = [*launcher_cmd, "-m", "components.train", *cmd]
            # its own rendezvous; a configuration error is not run again by a retry of this task
            run_stage_process(stage_cmd, work, launch_env(os.environ))
        shutil.copytree(out / "pipeline", pipeline.path, dirs_exist_ok=True)
        losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
        metrics.log_metric("final_loss", losses[-1])
        metrics.log_metric("steps", len(losses))
        summary = json.loads((out / "run.json").read_text())
        run_id = summary.get("mlflow_run_id", "")
        if summary.get("val_loss") is not None:  # the held-out split's loss (with ``heldout``)
            metrics.log_metric("val_loss", summary["val_loss"])
            pipeline.metadata["val_loss"] = summary["val_loss"]
        pipeline.metadata.update(
            {"stage": stage, "profile": profile, "final_loss": losses[-1], "mlflow_run_id": run_id,
             "export_dir": str(out / "pipeline") if work_root else ""}
        )  # fmt: skip
        return run_id
