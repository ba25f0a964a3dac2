"""Multi-node training on Kubernetes with Kubeflow Trainer v2: a ``TrainJob`` for one stage.

Trainer v2 (``trainer.kubeflow.org/v1alpha1``) replaces Training Operator v1's ``PyTorchJob``
(:mod:`components.train.pytorchjob`, kept for clusters still on v1). A TrainJob names a runtime
(``spec.runtimeRef``) and fills in the trainer: image, command, ``numNodes``, ``resourcesPerNode``
and env. Pod-level settings (node selector, tolerations, the cache PVC, ``/dev/shm``) go in
``spec.runtimePatches`` — the API that replaced ``podTemplateOverrides`` in Trainer 2.3 — applied
to the runtime's ``node`` replicated job and its ``node`` container.

The default runtime is ``torch-distributed``: its Torch policy starts ``numNodes`` pods of this
image and sets the ``PET_*`` variables ``torchrun`` reads (``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``), so every pod runs ``torchrun -m components.train ...`` and
DeepSpeed joins the process group torchrun set up. Trainer's ``deepspeed-distributed`` runtime is
MPI-based instead (sshd worker pods running Trainer's own DeepSpeed image; only the launcher gets
this image and command), so it cannot run this trainer and is refused; a cluster-specific runtime
with a Torch policy can be named with ``runtime``.

``python -m components.train.trainjob --nodes 4 --gpus-per-node 8 --stage hq --manifest ...
--output-dir ... > job.yaml`` then ``kubectl apply -f job.yaml``; :func:`wait_for_trainjob` follows
one to the end and raises the job's own failure message.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
import yaml
from kubeflow_trainer_api import models as m

from common.cli import run_cli
from common.errors import ConfigError
from components.image import BASE_IMAGE
from components.train.config import STAGE_DEFAULTS, Stage

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
DEFAULT_RUNTIME = "torch-distributed"
# Trainer's MPI-based DeepSpeed runtime: its worker pods run sshd in Trainer's own image.
MPI_DEEPSPEED_RUNTIME = "deepspeed-distributed"
TRAINER_CONTAINER = "node"  # the trainer container (and replicated job) name in Trainer's runtimes
PATCH_MANAGER = "lumina-pipeline/train"
# JobSet names pods <job>-node-0-<index>, which must stay a 63-character DNS label: leave room.
MAX_NAME_LENGTH = 48
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


def trainjob_name(run_id: str, stage: str, prefix: str = "lumina") -> str:
    """``<prefix>-<stage>-<run id>`` as an RFC 1035 label (what Trainer requires of a TrainJob name),
    shortened with a hash of the full name when it would be too long for the pods' host names."""
    raw = "-".join(part for part in (prefix, stage, run_id) if part)
    label = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if not label or not label[0].isalpha():
        label = f"j-{label}".rstrip("-")
    if len(label) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        label = f"{label[: MAX_NAME_LENGTH - 9].rstrip('-')}-{digest}"
    return label


def _label_value(value: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")


def stage_args(
    manifest: str,
    output_dir: str,
    *,
    stage: str = "lowres",
    profile: str = "full",
    steps: int | None = None,
    seed: int | None = None,
    init_from: str | None = None,
    latents: str | None = None,
    config: str | None = None,
    image_root: str | None = None,
) -> list[str]:
    """The ``python -m components.train`` options of one stage (paths on the shared volume)."""
    if stage not in {s.value for s in Stage}:
        raise ConfigError(f"unknown stage {stage!r} (expected one of {', '.join(s.value for s in Stage)})")
    if profile not in STAGE_DEFAULTS:
        raise ConfigError(f"unknown profile {profile!r} (expected one of {', '.join(STAGE_DEFAULTS)})")
    if not manifest or not output_dir:
        raise ConfigError("a stage needs --manifest and --output-dir (paths on the shared volume)")
    for flag, number in (("steps", steps), ("seed", seed)):
        if number is not None and number < (1 if flag == "steps" else 0):
            raise ConfigError(f"--{flag} must be {'>= 1' if flag == 'steps' else '>= 0'} (got {number})")
    args = ["--manifest", manifest, "--output-dir", output_dir, "--stage", stage, "--profile", profile]
    for flag, value in (
        ("--steps", steps),
        ("--seed", seed),
        ("--init-from", init_from),
        ("--latents", latents),
        ("--config", config),
        ("--image-root", image_root),
    ):
        if value is not None and value != "":
            args += [flag, str(value)]
    return args


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> m.IoK8sApiCoreV1EnvVar:
    ref = m.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=optional or None)
    return m.IoK8sApiCoreV1EnvVar(name=name, value_from=m.IoK8sApiCoreV1EnvVarSource(secret_key_ref=ref))


def trainjob_manifest(
    train_args: list[str],
    *,
    run_id: str,
    stage: str,
    nodes: int = 2,
    gpus_per_node: int = 8,
    cpu: str = "32",
    memory: str = "256Gi",
    image: str = BASE_IMAGE,
    namespace: str = "default",
    name: str | None = None,
    runtime: str = DEFAULT_RUNTIME,
    runtime_kind: str = "ClusterTrainingRuntime",
    pvc: str = "lumina-cache",
    mount: str = "/cache",
    s3_secret: str = "lumina-s3",
    mlflow_secret: str = "lumina-mlflow",
    shm_size: str = "64Gi",
    log_format: str = "json",
    node_selector: Mapping[str, str] | None = None,
    tolerations: list[Mapping[str, str]] | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """The TrainJob of one training stage (``train_args``: the ``components.train`` options, see
    :func:`stage_args`), as a plain dict with the API's field names."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"nodes and gpus_per_node must be >= 1 (got {nodes}, {gpus_per_node})")
    if not {"--output-dir", "--manifest"} <= set(train_args):
        raise ConfigError("train_args need --manifest and --output-dir (paths on the shared volume)")
    if stage not in {s.value for s in Stage}:
        raise ConfigError(f"unknown stage {stage!r} (expected one of {', '.join(s.value for s in Stage)})")
    if runtime == MPI_DEEPSPEED_RUNTIME:
        raise ConfigError(
            f"runtime {MPI_DEEPSPEED_RUNTIME} is MPI-based (sshd workers in Trainer's own image) and "
            f"cannot run torchrun; use {DEFAULT_RUNTIME} or a Torch-policy runtime"
        )
    if runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        raise ConfigError(
            f"runtime_kind must be ClusterTrainingRuntime or TrainingRuntime (got {runtime_kind})"
        )
    if log_format not in ("json", "text"):
        raise ConfigError(f"log_format must be json or text (got {log_format!r})")
    job_name = name or trainjob_name(run_id, stage)
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job_name) or len(job_name) > MAX_NAME_LENGTH:
        raise ConfigError(f"job name {job_name!r} is not a DNS label of at most {MAX_NAME_LENGTH} characters")

    env = [
        m.IoK8sApiCoreV1EnvVar(name="LUMINA_LOG_FORMAT", value=log_format),
        m.IoK8sApiCoreV1EnvVar(name="TORCH_EXTENSIONS_DIR", value=f"{mount}/torch_extensions"),
        _secret_env("MLFLOW_TRACKING_URI", mlflow_secret, "MLFLOW_TRACKING_URI"),
        *(_secret_env(key, s3_secret, key, optional=True) for key in S3_KEYS),
    ]
    if log_format == "json":
        env.append(m.IoK8sApiCoreV1EnvVar(name="TQDM_DISABLE", value="1"))
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    resources = {
        "nvidia.com/gpu": quantity(str(gpus_per_node)),
        "cpu": quantity(cpu),
        "memory": quantity(memory),
    }
    trainer = m.TrainerV1alpha1Trainer(
        image=image,
        command=["torchrun", "-m", "components.train"],
        args=list(train_args),
        num_nodes=nodes,
        num_proc_per_node=gpus_per_node,
        resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(limits=resources, requests=dict(resources)),
        env=env,
    )

    pod_spec = m.TrainerV1alpha1PodSpecPatch(
        node_selector=dict(DEFAULT_NODE_SELECTOR if node_selector is None else node_selector) or None,
        tolerations=[
            m.IoK8sApiCoreV1Toleration(**tol)
            for tol in (DEFAULT_TOLERATIONS if tolerations is None else tolerations)
        ]
        or None,
        volumes=[
            m.IoK8sApiCoreV1Volume(
                name="cache",
                persistent_volume_claim=m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claim_name=pvc),
            ),
            m.IoK8sApiCoreV1Volume(
                name="dshm",
                empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
                    medium="Memory", size_limit=quantity(shm_size)
                ),
            ),
        ],
        containers=[
            m.TrainerV1alpha1ContainerPatch(
                name=TRAINER_CONTAINER,
                volume_mounts=[
                    m.IoK8sApiCoreV1VolumeMount(name="cache", mount_path=mount),
                    m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm"),
                ],
                security_context=m.IoK8sApiCoreV1SecurityContext(
                    run_as_non_root=True, run_as_user=10001, allow_privilege_escalation=False
                ),
            )
        ],
        service_account_name=service_account,
    )
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicated_jobs=[
                        m.TrainerV1alpha1ReplicatedJobPatch(
                            name=TRAINER_CONTAINER,
                            template=m.TrainerV1alpha1JobTemplatePatch(
                                spec=m.TrainerV1alpha1JobSpecPatch(
                                    template=m.TrainerV1alpha1PodTemplatePatch(spec=pod_spec)
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    labels = {
        "app.kubernetes.io/part-of": "lumina-pipeline",
        "app.kubernetes.io/component": "train",
        "lumina-pipeline/stage": _label_value(stage),
    }
    if _label_value(run_id):
        labels["lumina-pipeline/run-id"] = _label_value(run_id)
    job = m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=job_name, namespace=namespace, labels=labels
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(api_group=GROUP, kind=runtime_kind, name=runtime),
            trainer=trainer,
            runtime_patches=[patch],
        ),
    )
    return job.to_dict()


def trainjob_yaml(train_args: list[str], **kwargs: Any) -> str:
    """:func:`trainjob_manifest` as YAML (no anchors, keys in the API's order)."""

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(trainjob_manifest(train_args, **kwargs), Dumper=_NoAliases, sort_keys=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def job_failure_message(status: Mapping[str, Any]) -> str | None:
    """``<reason>: <message>`` of a TrainJob's ``Failed`` condition (one line), or None when it has
    not failed. Takes the job's ``.status`` or the whole object."""
    if "conditions" not in status and isinstance(status.get("status"), Mapping):
        status = status["status"]
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Failed" and str(cond.get("status")) == "True":
            reason, message = _one_line(cond.get("reason") or ""), _one_line(cond.get("message") or "")
            return ": ".join(p for p in (reason, message) if p) or "Failed"
    return None


def _is_complete(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Complete" and str(c.get("status")) == "True" for c in status.get("conditions") or []
    )


class CustomObjects(Protocol):
    """What :func:`wait_for_trainjob` needs of ``kubernetes.client.CustomObjectsApi``."""

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> Mapping[str, Any]: ...


class TrainJobFailedError(RuntimeError):
    """The TrainJob ended ``Failed``; the message is the job's reason and message, one line."""


def wait_for_trainjob(
    api: CustomObjects,
    name: str,
    namespace: str = "default",
    timeout_s: float = 7 * 24 * 3600,
    poll_s: float = 30.0,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll a TrainJob until its ``Complete`` or ``Failed`` condition; return the finished object.

    ``api``: a ``kubernetes.client.CustomObjectsApi`` (or anything with its
    ``get_namespaced_custom_object``). Raises :class:`TrainJobFailedError` with the job's failure
    message, ``TimeoutError`` after ``timeout_s``."""
    deadline = clock() + timeout_s
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        failure = job_failure_message(status)
        if failure is not None:
            raise TrainJobFailedError(f"TrainJob {namespace}/{name} failed: {failure}")
        if _is_complete(status):
            return dict(obj)
        if clock() >= deadline:
            raise TimeoutError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:g} s")
        sleep(poll_s)


class TrainJobApi(CustomObjects, Protocol):
    """What :func:`run_trainjob` needs of ``kubernetes.client.CustomObjectsApi``."""

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: Mapping[str, Any]
    ) -> Mapping[str, Any]: ...

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> Mapping[str, Any]: ...


def _status_code(exc: Exception) -> int | None:
    return getattr(exc, "status", None)  # kubernetes.client.ApiException carries the HTTP status


def _existing(api: CustomObjects, name: str, namespace: str) -> Mapping[str, Any] | None:
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:
        if _status_code(exc) == 404:
            return None
        raise


def run_trainjob(
    api: TrainJobApi,
    job: Mapping[str, Any],
    *,
    timeout_s: float = 7 * 24 * 3600,
    poll_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Create a stage's TrainJob and follow it to the end (see :func:`wait_for_trainjob`).

    A retried pipeline task meets its own job again (the name is the run and stage): one still
    running is followed, not duplicated; a complete one is taken as done; a failed one is deleted
    and created again, and the new pods resume from the stage's last complete checkpoint."""
    name, namespace = job["metadata"]["name"], job["metadata"].get("namespace") or "default"
    found = _existing(api, name, namespace)
    if found is not None:
        status = found.get("status") or {}
        if _is_complete(status):
            log(f"TrainJob {namespace}/{name} already complete")
            return dict(found)
        if job_failure_message(status) is None:
            log(f"TrainJob {namespace}/{name} is still running; following it")
            return wait_for_trainjob(api, name, namespace, timeout_s, poll_s, sleep=sleep, clock=clock)
        log(f"TrainJob {namespace}/{name} failed before ({job_failure_message(status)}); creating it again")
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        deadline = clock() + 600
        while _existing(api, name, namespace) is not None:  # deletion is asynchronous
            if clock() >= deadline:
                raise TimeoutError(f"TrainJob {namespace}/{name} was not deleted within 600 s")
            sleep(min(poll_s, 5.0))
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(job))
    log(f"TrainJob {namespace}/{name} created: kubectl -n {namespace} get trainjob {name}")
    return wait_for_trainjob(api, name, namespace, timeout_s, poll_s, sleep=sleep, clock=clock)


NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def current_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (the pipeline's), from its service account."""
    try:
        return NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def kubernetes_api() -> TrainJobApi:
    """``CustomObjectsApi`` from the in-cluster service account (or the local kubeconfig)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def run_stage_trainjob(
    train_args: list[str],
    settings: Mapping[str, Any],
    *,
    run_id: str,
    stage: str,
    nodes: int,
    gpus_per_node: int,
    api: TrainJobApi | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The pipeline's train step on a cluster: the stage's TrainJob (``settings``: the keyword
    arguments of :func:`trainjob_manifest` the compiled pipeline fixed, plus ``poll_s``), created
    in this pod's namespace unless ``settings`` names one, and followed to the end."""
    options = dict(settings)
    poll_s = float(options.pop("poll_s", 30.0))
    options.setdefault("namespace", current_namespace())
    job = trainjob_manifest(train_args, run_id=run_id, stage=stage, nodes=nodes, gpus_per_node=gpus_per_node,
                            **options)  # fmt: skip
    return run_trainjob(api or kubernetes_api(), job, poll_s=poll_s, log=log)


app = typer.Typer(add_completion=False, help="Write a Kubeflow Trainer v2 TrainJob for a multi-node stage.")


@app.command()
def write(
    manifest: Annotated[str, typer.Option(help="tier manifest or folder on the shared volume")],
    output_dir: Annotated[str, typer.Option(help="stage output folder on the shared volume")],
    stage: str = "lowres",
    profile: str = "full",
    nodes: int = 2,
    gpus_per_node: int = 8,
    run_id: Annotated[str, typer.Option(help="pipeline run id (part of the job name)")] = "manual",
    steps: int | None = None,
    seed: int | None = None,
    init_from: Annotated[str | None, typer.Option(help="previous stage's pipeline folder")] = None,
    latents: Annotated[str | None, typer.Option(help="latent index from components.latents")] = None,
    config: Annotated[str | None, typer.Option(help="YAML with any TrainConfig field")] = None,
    image_root: Annotated[str | None, typer.Option(help="root for relative image paths")] = None,
    name: Annotated[str | None, typer.Option(help="job name (default lumina-<stage>-<run id>)")] = None,
    runtime: Annotated[
        str, typer.Option(help="(Cluster)TrainingRuntime with a Torch policy")
    ] = DEFAULT_RUNTIME,
    runtime_kind: str = "ClusterTrainingRuntime",
    image: str = BASE_IMAGE,
    namespace: str = "default",
    cpu: str = "32",
    memory: str = "256Gi",
    pvc: str = "lumina-cache",
    out: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
) -> None:
    """Print (or write) the TrainJob YAML."""
    args = stage_args(manifest, output_dir, stage=stage, profile=profile, steps=steps, seed=seed,
                      init_from=init_from, latents=latents, config=config, image_root=image_root)  # fmt: skip
    text = trainjob_yaml(args, run_id=run_id, stage=stage, nodes=nodes, gpus_per_node=gpus_per_node, cpu=cpu,
                         memory=memory, image=image, namespace=namespace, name=name, runtime=runtime,
                         runtime_kind=runtime_kind, pvc=pvc)  # fmt: skip
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


if __name__ == "__main__":
    run_cli(app)
