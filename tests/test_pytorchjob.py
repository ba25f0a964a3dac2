"""The multi-node PyTorchJob for a training stage: structure, and its pod template is a valid Pod."""

import subprocess
import sys

import pytest
import yaml

from common.errors import ConfigError
from components.train.pytorchjob import pytorchjob_manifest

ARGS = ["--manifest", "/cache/tiers", "--output-dir", "/cache/out/hq", "--stage", "hq"]


def test_job_shape_and_pod_template_validate():
    import kubernetes_validate  # pinned in the dev extras

    job = pytorchjob_manifest("lumina-train-hq", ARGS, nodes=4, gpus_per_node=8)
    assert job["kind"] == "PyTorchJob" and job["spec"]["nprocPerNode"] == "8"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["command"][:3] == [
        "torchrun",
        "-m",
        "components.train",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert all("value" not in e for e in container["env"] if e["name"].startswith("AWS_"))  # from Secrets
    for role in ("Master", "Worker"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, **specs[role]["template"]}
        kubernetes_validate.validate(pod, "1.31.0", strict=True)
    single = pytorchjob_manifest("one", ARGS, nodes=1)
    assert "Worker" not in single["spec"]["pytorchReplicaSpecs"]


def test_bad_job_requests_are_clear_errors():
    with pytest.raises(ConfigError, match="nodes and gpus_per_node"):
        pytorchjob_manifest("x", ARGS, nodes=0)
    with pytest.raises(ConfigError, match="--manifest and --output-dir"):
        pytorchjob_manifest("x", ["--stage", "hq"])


def test_cli_writes_yaml_without_anchors():
    out = subprocess.run(
        [sys.executable, "-m", "components.train.pytorchjob", "--manifest", "/c/t", "--output-dir", "/c/o",
         "--nodes", "2", "--init-from", "/c/prev/pipeline"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "&id" not in out.stdout
    job = yaml.safe_load(out.stdout)
    assert (
        "--init-from"
        in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    )
