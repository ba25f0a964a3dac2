"""Multi-node training on Kubernetes: a Kubeflow Training Operator ``PyTorchJob`` for one stage.

The operator starts ``nodes`` pods (one Master, the rest Workers) and sets the ``PET_*`` variables
``torchrun`` reads (``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ...), so every pod
runs the same ``torchrun -m components.train ...`` over its GPUs; DeepSpeed picks up the process
group. Data and outputs live on a shared PVC.

``python -m components.train.pytorchjob --nodes 4 --gpus-per-node 8 --stage hq ... > job.yaml``
then ``kubectl apply -f job.yaml``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from common.cli import run_cli
from common.errors import ConfigError
from components.image import BASE_IMAGE


def pytorchjob_manifest(
    name: str,
    train_args: list[str],
    *,
    nodes: int = 2,
    gpus_per_node: int = 8,
    image: str = BASE_IMAGE,
    namespace: str = "default",
    pvc: str = "lumina-cache",
    mount: str = "/cache",
    s3_secret: str = "lumina-s3",
    mlflow_secret: str = "lumina-mlflow",
    shm_size: str = "64Gi",
) -> dict[str, Any]:
    """The PyTorchJob for one training stage (``train_args``: the ``components.train`` options)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"nodes and gpus_per_node must be >= 1 (got {nodes}, {gpus_per_node})")
    if not {"--output-dir", "--manifest"} <= set(train_args):
        raise ConfigError("train_args need --manifest and --output-dir (paths on the shared volume)")
    env = [
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{mount}/torch_extensions"},
        {
            "name": "MLFLOW_TRACKING_URI",
            "valueFrom": {"secretKeyRef": {"name": mlflow_secret, "key": "MLFLOW_TRACKING_URI"}},
        },
    ] + [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key, "optional": True}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    ]
    container = {
        "name": "pytorch",  # the operator expects this container name
        "image": image,
        "command": ["torchrun", "-m", "components.train", *train_args],
        "env": env,
        "resources": {"limits": {"nvidia.com/gpu": gpus_per_node}},
        "volumeMounts": [{"name": "cache", "mountPath": mount}, {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False},
    }
    pod = {
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "cache", "persistentVolumeClaim": {"claimName": pvc}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    }
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if nodes > 1:
        replicas["Worker"] = {
            "replicas": nodes - 1,
            "restartPolicy": "OnFailure",
            "template": copy.deepcopy(pod),
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "lumina-pipeline"},
        },
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
            "pytorchReplicaSpecs": replicas,
        },
    }


app = typer.Typer(add_completion=False, help="Write a PyTorchJob for a multi-node training stage.")


@app.command()
def write(
    manifest: Annotated[str, typer.Option(help="tier manifest or folder on the shared volume")],
    output_dir: Annotated[str, typer.Option(help="stage output folder on the shared volume")],
    stage: str = "lowres",
    profile: str = "full",
    nodes: int = 2,
    gpus_per_node: int = 8,
    init_from: Annotated[str | None, typer.Option(help="previous stage's pipeline folder")] = None,
    image_root: Annotated[str | None, typer.Option(help="root for relative image paths")] = None,
    name: Annotated[str | None, typer.Option(help="job name (default lumina-train-<stage>)")] = None,
    image: str = BASE_IMAGE,
    namespace: str = "default",
    out: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
) -> None:
    """Print (or write) the PyTorchJob YAML."""
    args = ["--manifest", manifest, "--output-dir", output_dir, "--stage", stage, "--profile", profile]
    for flag, value in (("--init-from", init_from), ("--image-root", image_root)):
        if value:
            args += [flag, value]
    job = pytorchjob_manifest(name or f"lumina-train-{stage}", args, nodes=nodes, gpus_per_node=gpus_per_node,
                              image=image, namespace=namespace)  # fmt: skip
    text = yaml.safe_dump(job, sort_keys=False)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


if __name__ == "__main__":
    run_cli(app)
