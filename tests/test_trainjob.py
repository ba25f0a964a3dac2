"""The Kubeflow Trainer v2 TrainJob for a training stage: it validates against the vendored TrainJob CRD
(kubeflow/trainer v2.3.0), carries what the torch-distributed runtime needs, and a failed job's message
reaches the pipeline."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

from common.errors import ConfigError
from components.train.trainjob import (
    TrainJobFailedError,
    job_failure_message,
    run_stage_trainjob,
    stage_args,
    trainjob_manifest,
    trainjob_name,
    trainjob_yaml,
    wait_for_trainjob,
)
from tests.crd_schema import crd_validator, load_crd

CRD = Path(__file__).parent / "crds" / "trainer.kubeflow.org_trainjobs.yaml"
ARGS = stage_args(
    "/cache/tiers",
    "/cache/out/hq",
    stage="hq",
    steps=500,
    seed=7,
    init_from="/cache/out/highres/pipeline",
    latents="/cache/latents",
    config="/cache/hq.yaml",
)


@pytest.fixture(scope="module")
def crd():
    return load_crd(CRD)


@pytest.fixture(scope="module")
def validator(crd):
    (version,) = crd["spec"]["versions"]
    assert crd["spec"]["group"] == "trainer.kubeflow.org" and version["name"] == "v1alpha1"
    return crd_validator(version["schema"]["openAPIV3Schema"])


def _check(validator, crd, job):
    validator.validate(job)
    # the CRD's root CEL rules on metadata.name (metadata itself is a free object in the schema)
    rules = {
        r["rule"] for r in crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    }
    assert "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')" in rules
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    assert len(job["metadata"]["name"]) <= 63


def _node_pod(job):
    (patch,) = job["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"  # the trainer replicated job of torch-distributed
    return rjob["template"]["spec"]["template"]["spec"]


def test_job_validates_against_the_crd_and_carries_the_stage(validator, crd):
    job = trainjob_manifest(ARGS, run_id="Run_42/abc", stage="hq", nodes=4, gpus_per_node=8)
    _check(validator, crd, job)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "lumina-hq-run-42-abc"
    assert job["metadata"]["labels"]["lumina-pipeline/stage"] == "hq"
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["command"] == ["torchrun", "-m", "components.train"]
    args = trainer["args"]
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs == {
        "--manifest": "/cache/tiers",
        "--output-dir": "/cache/out/hq",
        "--stage": "hq",
        "--profile": "full",
        "--steps": "500",
        "--seed": "7",
        "--init-from": "/cache/out/highres/pipeline",
        "--latents": "/cache/latents",
        "--config": "/cache/hq.yaml",
    }
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "32", "memory": "256Gi"}
    env = {e["name"]: e for e in trainer["env"]}
    assert not any(name.startswith("PET_") for name in env)  # reserved: Trainer's webhook rejects them
    assert env["LUMINA_LOG_FORMAT"]["value"] == "json"
    assert env["TORCH_EXTENSIONS_DIR"]["value"] == "/cache/torch_extensions"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "lumina-mlflow",
        "key": "MLFLOW_TRACKING_URI",
    }
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "lumina-s3", "key": key, "optional": True}
    # the models read the job back unchanged: every field name is one the API knows
    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job


def test_pod_settings_go_to_the_node_job_and_container(validator, crd):
    job = trainjob_manifest(ARGS, run_id="r1", stage="hq", nodes=2, service_account="trainer")
    _check(validator, crd, job)
    pod = _node_pod(job)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "trainer"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "lumina-cache"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    (container,) = pod["containers"]
    assert container["name"] == "node"  # torch-distributed's trainer container
    assert "env" not in container  # Trainer forbids env patches on "node": env is in spec.trainer.env
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    assert mounts == {"/cache": "cache", "/dev/shm": "dshm"}
    assert container["securityContext"]["runAsNonRoot"] is True
    no_selector = trainjob_manifest(ARGS, run_id="r1", stage="hq", node_selector={}, tolerations=[])
    _check(validator, crd, no_selector)
    assert "nodeSelector" not in _node_pod(no_selector) and "tolerations" not in _node_pod(no_selector)


def test_schema_check_is_strict_enough_to_catch_wrong_field_names(validator):
    job = trainjob_manifest(ARGS, run_id="r1", stage="hq")
    wrong = []
    for path, key, bad_key in (
        (["spec"], "runtimePatches", "podTemplateOverrides"),  # the pre-2.3 API name
        (["spec", "trainer"], "numNodes", "num_nodes"),
        (["spec", "trainer", "resourcesPerNode"], "limits", "limit"),
    ):
        broken = copy.deepcopy(job)
        node = broken
        for part in path:
            node = node[part]
        node[bad_key] = node.pop(key)
        wrong.append(broken)
    nested = copy.deepcopy(job)
    _node_pod(nested)["containers"][0]["volumeMount"] = []
    wrong.append(nested)
    for broken in wrong:
        with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
            validator.validate(broken)
    missing = copy.deepcopy(job)
    del missing["spec"]["runtimeRef"]
    with pytest.raises(jsonschema.ValidationError, match="runtimeRef"):
        validator.validate(missing)


def test_names_are_dns_labels():
    assert trainjob_name("7f3c2a9e-1b2d-4c5e-9f00-123456789abc", "lowres").startswith(
        "lumina-lowres-7f3c2a9e"
    )
    long = trainjob_name("x" * 200, "highres")
    assert len(long) <= 48 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", long)
    assert long != trainjob_name("x" * 199, "highres")  # the hash keeps long run ids apart
    assert trainjob_name("__", "hq", prefix="9") == "j-9-hq"


def test_bad_requests_are_one_line_errors():
    cases = [
        (lambda: trainjob_manifest(ARGS, run_id="r", stage="hq", nodes=0), "nodes and gpus_per_node"),
        (lambda: trainjob_manifest(ARGS, run_id="r", stage="hq", gpus_per_node=0), "nodes and gpus_per_node"),
        (lambda: trainjob_manifest(ARGS, run_id="r", stage="medres"), "unknown stage 'medres'"),
        (lambda: trainjob_manifest(["--stage", "hq"], run_id="r", stage="hq"), "--manifest and --output-dir"),
        (
            lambda: trainjob_manifest(ARGS, run_id="r", stage="hq", runtime="deepspeed-distributed"),
            "MPI-based",
        ),
        (lambda: trainjob_manifest(ARGS, run_id="r", stage="hq", name="Bad_Name"), "not a DNS label"),
        (lambda: stage_args("/m", "/o", stage="medres"), "unknown stage"),
        (lambda: stage_args("/m", "/o", profile="huge"), "unknown profile"),
        (lambda: stage_args("/m", "/o", steps=0), "--steps must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            call()
        assert "\n" not in str(info.value)


def test_failed_job_message_reaches_the_raised_error():
    failed = {
        "conditions": [
            {"type": "Suspended", "status": "False", "reason": "Resumed", "message": "resumed"},
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "jobset failed:\n  node-0 exceeded activeDeadlineSeconds",
            },
        ]
    }
    assert (
        job_failure_message(failed)
        == "DeadlineExceeded: jobset failed: node-0 exceeded activeDeadlineSeconds"
    )
    assert job_failure_message({"status": failed}) == job_failure_message(failed)  # whole object too
    assert job_failure_message({"conditions": [{"type": "Failed", "status": "False"}]}) is None
    assert job_failure_message({}) is None

    class FakeApi:
        def __init__(self, statuses):
            self.statuses, self.calls = list(statuses), []

        def get_namespaced_custom_object(self, group, version, namespace, plural, name):
            self.calls.append((group, version, namespace, plural, name))
            return {"metadata": {"name": name}, "status": self.statuses.pop(0)}

    api = FakeApi([{}, {"conditions": [{"type": "Created", "status": "True"}]}, failed])
    sleeps = []
    with pytest.raises(TrainJobFailedError) as info:
        wait_for_trainjob(api, "lumina-hq-r1", "ml", timeout_s=3600, poll_s=5, sleep=sleeps.append)
    assert str(info.value) == (
        "TrainJob ml/lumina-hq-r1 failed: DeadlineExceeded: "
        "jobset failed: node-0 exceeded activeDeadlineSeconds"
    )
    assert api.calls[0] == ("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", "lumina-hq-r1")
    assert sleeps == [5, 5]

    done = FakeApi([{}, {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]}])
    assert wait_for_trainjob(done, "j", poll_s=1, sleep=lambda s: None)["metadata"]["name"] == "j"

    now = iter([0.0, 5.0, 11.0])
    with pytest.raises(TimeoutError, match="did not finish within 10 s"):
        wait_for_trainjob(FakeApi([{}, {}]), "j", timeout_s=10, sleep=lambda s: None, clock=lambda: next(now))


def test_kubernetes_client_fits_the_protocol():
    from kubernetes import client

    for method in ("get", "create", "delete"):
        assert callable(getattr(client.CustomObjectsApi, f"{method}_namespaced_custom_object"))


COMPLETE = {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]}
FAILED = {
    "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailed", "message": "node-1 OOMKilled"}]
}


class Cluster:
    """A stand-in for the Kubernetes API holding TrainJobs; each created job goes through ``script``
    (its statuses, one per poll). Errors look like ``kubernetes.client.ApiException``."""

    def __init__(self, script=(), existing=None):
        self.jobs = dict(existing or {})
        self.script, self.created, self.deleted = list(script), [], []

    def _missing(self, name):
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=404, reason=f"trainjobs {name} not found")

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if name not in self.jobs:
            raise self._missing(name)
        job = self.jobs[name]
        if self.script and job.get("_scripted"):
            job["status"] = self.script.pop(0)
        return job

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert body["metadata"]["namespace"] == namespace and body["metadata"]["name"] not in self.jobs
        self.created.append(copy.deepcopy(body))
        self.jobs[body["metadata"]["name"]] = {**copy.deepcopy(body), "status": {}, "_scripted": True}
        return body

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)
        del self.jobs[name]
        return {}


def _settings():
    from pipelines.lumina_pipeline import ClusterSettings, trainjob_settings

    return {**trainjob_settings(ClusterSettings()), "namespace": "ml", "poll_s": 0}


def test_the_train_step_creates_a_valid_job_and_follows_it(validator, crd):
    cluster, lines = Cluster(script=[{}, COMPLETE]), []
    run_stage_trainjob(ARGS, _settings(), run_id="r1", stage="hq", nodes=4, gpus_per_node=8, api=cluster,
                       log=lines.append)  # fmt: skip
    (job,) = cluster.created
    _check(validator, crd, job)
    assert job["metadata"]["name"] == "lumina-hq-r1" and job["spec"]["trainer"]["numNodes"] == 4
    assert job["spec"]["trainer"]["args"] == ARGS
    resources = job["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert resources["nvidia.com/gpu"] == "8" and resources["cpu"] == "64" and resources["memory"] == "512Gi"
    pod = _node_pod(job)
    assert {v["name"]: v for v in pod["volumes"]}["cache"]["persistentVolumeClaim"][
        "claimName"
    ] == "lumina-cache"
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": "64Gi",
    }
    assert (
        pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"] for e in job["spec"]["trainer"]["env"] if "valueFrom" in e
    }
    assert secrets == {"lumina-s3", "lumina-mlflow"}
    assert any("created" in line for line in lines)


def test_a_failing_job_fails_the_step_with_its_message():
    cluster = Cluster(script=[{}, FAILED])
    with pytest.raises(TrainJobFailedError, match="failed: PodFailed: node-1 OOMKilled"):
        run_stage_trainjob(ARGS, _settings(), run_id="r1", stage="hq", nodes=2, gpus_per_node=1, api=cluster,
                           log=lambda line: None)  # fmt: skip


def test_a_retried_step_follows_reuses_or_recreates_its_job():
    def job(status):
        return {"metadata": {"name": "lumina-hq-r1"}, "status": status, "_scripted": True}

    kwargs = {"run_id": "r1", "stage": "hq", "nodes": 2, "gpus_per_node": 1, "log": lambda line: None}
    running = Cluster(script=[{}, COMPLETE], existing={"lumina-hq-r1": job({})})
    run_stage_trainjob(ARGS, _settings(), api=running, **kwargs)
    assert running.created == [] and running.deleted == []  # followed, not duplicated
    done = Cluster(existing={"lumina-hq-r1": job(COMPLETE)})
    run_stage_trainjob(ARGS, _settings(), api=done, **kwargs)
    assert done.created == []
    failed = Cluster(script=[{}, COMPLETE], existing={"lumina-hq-r1": {**job(FAILED), "_scripted": False}})
    run_stage_trainjob(ARGS, _settings(), api=failed, **kwargs)
    assert failed.deleted == ["lumina-hq-r1"] and len(failed.created) == 1  # the new pods resume


def test_inputs_are_staged_on_the_shared_volume(tmp_path):
    from components.train.launch import shared_copy, shared_init

    artifact = tmp_path / "artifact"
    (artifact / "sub").mkdir(parents=True)
    (artifact / "sub" / "lowres.parquet").write_text("x")
    work = tmp_path / "cache" / "runs" / "r1" / "hq"
    staged = shared_copy(artifact, work, "manifest")
    assert staged == work / "inputs" / "manifest" and (staged / "sub" / "lowres.parquet").read_text() == "x"
    (artifact / "sub" / "lowres.parquet").write_text("y")
    assert (shared_copy(artifact, work, "manifest") / "sub" / "lowres.parquet").read_text() == "y"
    export = tmp_path / "cache" / "runs" / "r1" / "highres" / "pipeline"
    export.mkdir(parents=True)
    (export / "model_index.json").write_text("{}")
    assert shared_init(artifact, {"export_dir": str(export)}, work) == export  # in place, no copy
    assert shared_init(artifact, {"export_dir": str(tmp_path / "gone")}, work) == work / "inputs" / "init"


def test_cli_prints_yaml_and_errors_in_one_line(validator, crd):
    base = [sys.executable, "-m", "components.train.trainjob", "--manifest", "/c/t", "--output-dir", "/c/o"]
    out = subprocess.run(
        [*base, "--nodes", "4", "--gpus-per-node", "8", "--stage", "hq", "--run-id", "run-9",
         "--init-from", "/c/prev/pipeline"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "&id" not in out.stdout
    job = yaml.safe_load(out.stdout)
    _check(validator, crd, job)
    assert job == trainjob_manifest(
        stage_args("/c/t", "/c/o", stage="hq", init_from="/c/prev/pipeline"),
        run_id="run-9", stage="hq", nodes=4, gpus_per_node=8,
    )  # fmt: skip
    assert yaml.safe_load(trainjob_yaml(ARGS, run_id="r", stage="hq")) == trainjob_manifest(
        ARGS, run_id="r", stage="hq"
    )
    for extra, message in (
        (["--nodes", "0"], "nodes and gpus_per_node"),
        (["--stage", "x"], "unknown stage"),
    ):
        bad = subprocess.run([*base, *extra], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ") and message in bad.stderr


def test_the_rbac_manifest_grants_what_the_train_step_calls():
    role, binding = yaml.safe_load_all(
        (Path(__file__).parents[1] / "pipelines" / "rbac-trainjob.yaml").read_text()
    )
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["trainer.kubeflow.org"] and rule["resources"] == ["trainjobs"]
    assert {"create", "get", "delete"} <= set(rule["verbs"])  # run_trainjob's calls
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
