"""The Kubeflow pipeline: plan → new-data → ingest ×groups → merge → (recaption → score) ×groups →
captions merge → tier → (grids → latents) ×groups → train (3 stages + unified) → evaluate → register.

The ``unified`` parameter turns on the paper's extra fine-tuning phase (Sec. 4): each group's grid
step pairs images with condition maps into Template C grids, and a fourth stage trains on them
mixed with ordinary images. Off, the grid steps write nothing and the fourth stage passes the HQ
model on unchanged (evaluation then has no before/after panel comparison).

``new-data`` decides whether the rest runs (``dsl.If``): always, unless ``only_new_data`` (recurring
runs) and a registered version was trained on a source with this plan's fingerprint; then the
``no-new-data`` step ends the run saying so.

The data steps fan out with ``dsl.ParallelFor`` over the plan's groups and fan in with
``dsl.Collected``; images stay in tar shards under ``data_root`` and only manifests, URIs and
hashes move between tasks. ``parallelism`` (how many groups run at once) is a compile-time setting
because KFP 2.17 writes it into the IR as a constant (``iteratorPolicy.parallelismLimit``).

(No ``from __future__ import annotations``: KFP reads real annotations.)

:func:`build_pipeline` returns the pipeline for a cluster (``cluster`` given: each train stage a
Kubeflow Trainer ``TrainJob`` created by a small task on the cache PVC, or with ``train_launcher:
pod`` a GPU pod; GPUs for recaption and latents; S3 and MLflow secrets as env) or for the local
runner (``cluster=None``: the same graph without Kubernetes settings, which the local runner does
not apply).
"""

import json
from typing import Literal

from kfp import dsl, kubernetes
from pydantic import BaseModel, ConfigDict

from components.evaluate.component import evaluate_op
from components.grids.component import grids_group_op
from components.ingest.component import ingest_group_op, ingest_merge_op
from components.latents.component import latents_group_op
from components.plan.component import plan_op
from components.recaption.component import captions_merge_op, recaption_group_op
from components.register.component import new_data_op, nothing_new_op, register_op
from components.tier.component import score_group_op, tier_op
from components.train.component import train_stage_op

PIPELINE_NAME = "lumina-pipeline"
STAGES = ("lowres", "highres", "hq", "unified")


class ClusterSettings(BaseModel):
    """Kubernetes settings for the compiled pipeline (a real cluster's values go here)."""

    model_config = ConfigDict(extra="forbid")

    accelerator_type: str = "nvidia.com/gpu"
    # trainjob: each stage is a Kubeflow Trainer TrainJob of train_nodes x gpus_per_node (pipeline
    # parameters; these are their defaults) created and followed by a small launcher task; pod:
    # the stage runs inside the KFP task's own pod on gpus_per_train_task GPUs.
    train_launcher: Literal["trainjob", "pod"] = "trainjob"
    train_nodes: int = 4
    gpus_per_node: int = 8
    trainjob_runtime: str = "torch-distributed"
    trainjob_runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    trainjob_cpu: str = "64"  # per node
    trainjob_memory: str = "512Gi"  # per node
    trainjob_shm_size: str = "64Gi"
    trainjob_service_account: str | None = None
    launcher_cpu: str = "1"
    launcher_memory: str = "4G"
    gpus_per_train_task: int = 1
    train_cpu_limit: str = "16"
    train_memory_limit: str = "128G"
    node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    tolerations: list[dict[str, str]] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    cache_pvc: str = "lumina-cache"
    cache_mount: str = "/cache"
    s3_secret: str = "lumina-s3"
    mlflow_secret: str = "lumina-mlflow"
    shm_size: str = "16Gi"
    train_retries: int = 2  # a preempted train task is retried and resumes from its last checkpoint
    data_root: str = "s3://lumina-data/plane"  # default of the data_root parameter: shards and latents
    parallelism: int = 16  # groups processed at once by each ParallelFor
    recaption_gpus: int = 1  # per recaption task (the VLM captioner)
    latents_gpus: int = 1  # per latent task (the VAE encoder: ~0.27 / 4.9 TFLOP an image at 256² / 1024²)
    data_cpu_request: str = "2"
    data_memory_request: str = "8G"
    data_cpu_limit: str = "8"
    data_memory_limit: str = "32G"
    log_format: Literal["json", "text"] = "json"  # LUMINA_LOG_FORMAT of every task (json: log collectors)


def _with_cluster_env(task: dsl.PipelineTask, cluster: ClusterSettings) -> None:
    """What every task needs on a cluster: S3 and MLflow secrets as env, and the log format."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=cluster.s3_secret,
        secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
        },
        optional=True,
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=cluster.mlflow_secret,
        secret_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"},
    )
    task.set_env_variable("LUMINA_LOG_FORMAT", cluster.log_format)
    if cluster.log_format == "json":
        task.set_env_variable("TQDM_DISABLE", "1")  # no progress bars between the JSON records


def _on_gpu_nodes(task: dsl.PipelineTask, cluster: ClusterSettings, gpus: int, cpu: str, memory: str) -> None:
    """``gpus`` accelerators, CPU/memory limits, and placement on the GPU nodes."""
    task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(gpus)
    task.set_cpu_limit(cpu).set_memory_limit(memory)
    for key, value in cluster.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in cluster.tolerations:
        kubernetes.add_toleration(task, **tol)


def _train_on_gpus(task: dsl.PipelineTask, cluster: ClusterSettings) -> None:
    _on_gpu_nodes(
        task, cluster, cluster.gpus_per_train_task, cluster.train_cpu_limit, cluster.train_memory_limit
    )
    kubernetes.mount_pvc(task, pvc_name=cluster.cache_pvc, mount_path=cluster.cache_mount)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size
    )
    task.set_env_variable("TORCH_EXTENSIONS_DIR", f"{cluster.cache_mount}/torch_extensions")
    # outputs and checkpoints live on the cache PVC under <run>/<stage> (work_root): a retry resumes
    task.set_retry(num_retries=cluster.train_retries, backoff_duration="60s")


def _train_launcher(task: dsl.PipelineTask, cluster: ClusterSettings) -> None:
    """The train task when a TrainJob does the training: a small pod on the cache PVC (where it
    stages the inputs and the job's pods write the outputs), retried like a training pod."""
    task.set_cpu_request(cluster.launcher_cpu).set_memory_request(cluster.launcher_memory)
    task.set_cpu_limit(cluster.launcher_cpu).set_memory_limit(cluster.launcher_memory)
    kubernetes.mount_pvc(task, pvc_name=cluster.cache_pvc, mount_path=cluster.cache_mount)
    task.set_retry(num_retries=cluster.train_retries, backoff_duration="60s")


def trainjob_settings(cluster: ClusterSettings) -> dict:
    """What the train step passes to :func:`components.train.trainjob.trainjob_manifest` (fixed at
    compile time, as JSON in the task's ``trainjob_json``)."""
    return {
        "runtime": cluster.trainjob_runtime,
        "runtime_kind": cluster.trainjob_runtime_kind,
        "cpu": cluster.trainjob_cpu,
        "memory": cluster.trainjob_memory,
        "pvc": cluster.cache_pvc,
        "mount": cluster.cache_mount,
        "s3_secret": cluster.s3_secret,
        "mlflow_secret": cluster.mlflow_secret,
        "shm_size": cluster.trainjob_shm_size,
        "log_format": cluster.log_format,
        "node_selector": cluster.node_selector,
        "tolerations": cluster.tolerations,
        "service_account": cluster.trainjob_service_account,
    }


def _data_task(task: dsl.PipelineTask, cluster: ClusterSettings) -> None:
    """CPU/memory requests and limits of a data step (ingest, merge, scoring, tiering)."""
    task.set_cpu_request(cluster.data_cpu_request).set_memory_request(cluster.data_memory_request)
    task.set_cpu_limit(cluster.data_cpu_limit).set_memory_limit(cluster.data_memory_limit)


def build_pipeline(cluster: ClusterSettings | None = None, parallelism: int | None = None):
    """The pipeline function; Kubernetes settings are applied when ``cluster`` is given.
    ``parallelism``: groups at once per ParallelFor (default: the cluster's, or 2 locally)."""
    limit = parallelism or (cluster.parallelism if cluster is not None else 2)
    default_root = cluster.data_root if cluster is not None else ""
    on_trainjob = cluster is not None and cluster.train_launcher == "trainjob"
    default_nodes, default_gpus = (cluster.train_nodes, cluster.gpus_per_node) if on_trainjob else (1, 1)
    launcher = {}
    if on_trainjob:
        launcher = {"launcher": "trainjob", "trainjob_json": json.dumps(trainjob_settings(cluster))}

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Recaption, curate, train, evaluate and register a Lumina-Image 2.0-style model.",
    )
    def lumina_pipeline(
        source: str,
        data_root: str = default_root,
        group_size: int = 5000,
        shard_size: int = 1000,
        model_name: str = "lumina-tiny",
        profile: str = "tiny",
        dedup_distance: int = 4,
        captions_file: str = "",
        recaption_backend: str = "auto",
        vlm_model: str = "",
        vlm_config_json: str = "",
        tier_config_json: str = "",
        lowres_steps: int = 0,
        highres_steps: int = 0,
        hq_steps: int = 0,
        unified: bool = False,
        unified_steps: int = 0,
        grid_config_json: str = "",
        seed: int = 0,
        eval_config_json: str = "",
        gate_json: str = "",
        mlflow_tracking_uri: str = "",
        git_sha: str = "",
        data_version: str = "",
        train_config_yaml: str = "",
        base_model: str = "",
        vae: str = "",
        only_new_data: bool = False,
        train_nodes: int = default_nodes,
        gpus_per_node: int = default_gpus,
    ) -> str:
        plan = plan_op(
            source=source, data_root=data_root, group_size=group_size, dedup_distance=dedup_distance
        )
        plan.set_display_name("plan")
        # The plan lists the source on every run (never from cache); its groups carry the listing's
        # fingerprint, so the steps after it hit KFP's cache exactly when the source is unchanged.
        plan.set_caching_options(False)
        groups = plan.outputs["Output"]
        check = new_data_op(
            groups=groups,
            model_name=model_name,
            only_new_data=only_new_data,
            mlflow_tracking_uri=mlflow_tracking_uri,
        )
        check.set_display_name("new-data")
        check.set_caching_options(False)  # it asks the registry about this run's source
        with dsl.If(check.outputs["decision"] == "train", "new-data"):
            with dsl.ParallelFor(groups, parallelism=limit) as group:
                ingest_group = ingest_group_op(group=group, shard_size=shard_size)
                ingest_group.set_display_name("ingest-group")
                ingest_group.set_retry(num_retries=2, backoff_duration="30s")  # object stores are flaky
            ingest = ingest_merge_op(
                groups=groups,
                parts=dsl.Collected(ingest_group.outputs["manifest"]),
                source=source,
                dedup_distance=dedup_distance,
                captions_file=captions_file,
            )
            ingest.set_display_name("ingest-merge")
            with dsl.ParallelFor(groups, parallelism=limit) as group:
                recaption_group = recaption_group_op(
                    group=group,
                    dataset_hash=ingest.outputs["Output"],
                    backend=recaption_backend,
                    vlm_model=vlm_model,
                    vlm_config_json=vlm_config_json,
                )
                recaption_group.set_display_name("recaption-group")
                score_group = score_group_op(captions=recaption_group.outputs["captions"])
                score_group.set_display_name("score-group")
            recaption = captions_merge_op(
                groups=groups,
                parts=dsl.Collected(recaption_group.outputs["captions"]),
                backend=recaption_backend,
            )
            recaption.set_display_name("captions-merge")
            tiers = tier_op(
                captions=dsl.Collected(recaption_group.outputs["captions"]),
                scores=dsl.Collected(score_group.outputs["scores"]),
                config_json=tier_config_json,
                groups=groups,
            )
            tiers.set_display_name("tier")
            tiers.after(recaption)  # tiers only from captions that passed the gate
            with dsl.ParallelFor(groups, parallelism=limit) as group:
                grids_group = grids_group_op(
                    group=group,
                    tiers_hash=tiers.outputs["Output"],
                    profile=profile,
                    seed=seed,
                    enabled=unified,
                    config_json=grid_config_json,
                )
                grids_group.set_display_name("grids-group")
                latents_group = latents_group_op(
                    group=group,
                    tiers_hash=tiers.outputs["Output"],
                    profile=profile,
                    seed=seed,
                    base_model=base_model,
                    vae=vae,
                    grids=grids_group.outputs["grids"],
                )
                latents_group.set_display_name("latents-group")
            previous = before_unified = None
            runs, train_tasks = {}, []
            stage_steps = (lowres_steps, highres_steps, hq_steps, unified_steps)
            for stage, steps in zip(STAGES, stage_steps, strict=True):
                # the first stage starts from base_model (when set; else a random model with the
                # trained VAE in ``vae``, when set), the others from the stage before (its VAE too)
                kwargs = (
                    {"init_from": previous.outputs["pipeline"]}
                    if previous is not None
                    else {"base_model": base_model, "vae": vae}
                )
                task = train_stage_op(
                    manifest=tiers.outputs["tiers"],
                    latents=dsl.Collected(latents_group.outputs["index"]),
                    work_root=f"{cluster.cache_mount}/runs" if cluster is not None else "",
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    stage=stage,
                    profile=profile,
                    steps=steps,
                    seed=seed,
                    nodes=train_nodes,
                    gpus_per_node=gpus_per_node,
                    config_yaml=train_config_yaml,
                    heldout=tiers.outputs["tiers"],  # its heldout.parquet: each stage's val_loss
                    **launcher,
                    **kwargs,
                    **({"enabled": unified} if stage == "unified" else {}),
                )
                task.set_display_name(f"train-{stage}")
                if on_trainjob:
                    _train_launcher(task, cluster)
                elif cluster is not None:
                    _train_on_gpus(task, cluster)
                runs[stage], before_unified, previous = task.outputs["Output"], previous, task
                train_tasks.append(task)
            final_model = previous.outputs["pipeline"]
            evaluate = evaluate_op(
                model=final_model,
                baseline=before_unified.outputs["pipeline"],  # grid panels before / after the phase
                compare_baseline=unified,
                config_json=eval_config_json,
                mlflow_tracking_uri=mlflow_tracking_uri,
                heldout=tiers.outputs["tiers"],  # val_loss on the held-out split
            )
            evaluate.set_display_name("evaluate")
            register = register_op(
                model=final_model,
                eval_result=evaluate.outputs["Output"],
                model_name=model_name,
                profile=profile,
                data_version=data_version,
                dataset_hash=ingest.outputs["Output"],
                captions_hash=recaption.outputs["Output"],
                tiers_hash=tiers.outputs["Output"],
                lowres_run=runs["lowres"],
                highres_run=runs["highres"],
                hq_run=runs["hq"],
                unified_run=runs["unified"],
                git_sha=git_sha,
                gate_json=gate_json,
                mlflow_tracking_uri=mlflow_tracking_uri,
                source_fingerprint=check.outputs["fingerprint"],
                pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            )
            register.set_display_name("register").set_retry(num_retries=2)
            register.set_caching_options(False)  # registering is a side effect: never served from cache
        with dsl.Else():
            unchanged = nothing_new_op(reason=check.outputs["reason"])
            unchanged.set_display_name("no-new-data")
        if cluster is not None:
            data_tasks = (plan, ingest_group, ingest, score_group, recaption, tiers, grids_group,
                          latents_group)  # fmt: skip
            for task in (*data_tasks, check, recaption_group, *train_tasks, evaluate, register, unchanged):
                _with_cluster_env(task, cluster)  # the stage runs log to the same MLflow as the rest
            for task in data_tasks:
                _data_task(task, cluster)
            _on_gpu_nodes(recaption_group, cluster, cluster.recaption_gpus, cluster.data_cpu_limit,
                          cluster.data_memory_limit)  # fmt: skip
            if cluster.latents_gpus:
                _on_gpu_nodes(latents_group, cluster, cluster.latents_gpus, cluster.data_cpu_limit,
                              cluster.data_memory_limit)  # fmt: skip
        return dsl.OneOf(register.outputs["Output"], unchanged.output)

    return lumina_pipeline
