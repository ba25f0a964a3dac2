"""The Kubeflow pipeline: compiled spec (strict protobuf, drift), remote API calls against a
recording loopback server, and the end-to-end local run with MLflow registration."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.cli import COMPILED
from pipelines.compile import compile_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")


def test_committed_yaml_matches_the_code(compiled):
    fresh, committed = (
        list(yaml.safe_load_all(compiled.read_text())),
        list(yaml.safe_load_all(COMPILED.read_text())),
    )
    for doc in (*fresh, *committed):
        doc.pop("sdkVersion", None)
    assert fresh == committed, "pipelines/lumina_pipeline.yaml is stale: run `make pipeline-compile`"


def test_every_step_runs_on_the_project_image_without_installing_anything(compiled):
    """The image has kfp and the project installed: a step's command installs nothing at start."""
    from components.image import BASE_IMAGE

    spec_doc = next(yaml.safe_load_all(compiled.read_text()))
    executors = spec_doc["deploymentSpec"]["executors"].values()
    containers = [e["container"] for e in executors if "container" in e]
    assert containers and all(c["image"] == BASE_IMAGE for c in containers)
    for container in containers:
        script = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in script and "ensurepip" not in script, script[:300]


def test_spec_parses_strictly_and_references_resolve(compiled):
    spec_doc, platform_doc = yaml.safe_load_all(compiled.read_text())
    spec = json_format.ParseDict(spec_doc, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    deployment = json_format.ParseDict(
        spec_doc["deploymentSpec"], pipeline_spec_pb2.PipelineDeploymentConfig()
    )
    top = spec.root.dag.tasks
    assert {"plan-op", "new-data-op", "condition-branches-1"} == set(top)
    branches = spec.components[top["condition-branches-1"].component_ref.name].dag.tasks.values()
    (skip_branch,) = [b for b in branches if b.trigger_policy.condition.startswith("!(")]
    (train_branch,) = [b for b in branches if not b.trigger_policy.condition.startswith("!(")]
    # everything after the plan runs only when there is data to train on; else one step says why
    assert train_branch.trigger_policy.condition.endswith(
        "['pipelinechannel--new-data-op-decision'] == 'train'"
    )
    assert skip_branch.trigger_policy.condition.startswith("!(")
    assert list(spec.components[skip_branch.component_ref.name].dag.tasks) == ["nothing-new-op"]
    assert top["new-data-op"].caching_options.enable_cache is False
    root = {**{n: t for n, t in top.items() if not n.startswith("condition")},
            **spec.components[train_branch.component_ref.name].dag.tasks}  # fmt: skip
    assert {
        "plan-op",
        "ingest-merge-op",
        "captions-merge-op",
        "tier-op",
        "evaluate-op",
        "register-op",
    } <= set(root)
    loops = {n: t for n, t in root.items() if t.WhichOneof("iterator") == "parameter_iterator"}
    assert len(loops) == 3  # ingest per group; recaption + scoring per group; grids + latents per group
    inner = {}
    for loop in loops.values():
        assert loop.iterator_policy.parallelism_limit == 16  # ClusterSettings.parallelism
        assert loop.parameter_iterator.items.input_parameter  # the plan's groups
        inner.update(spec.components[loop.component_ref.name].dag.tasks)
    assert {
        "ingest-group-op",
        "recaption-group-op",
        "score-group-op",
        "grids-group-op",
        "latents-group-op",
    } == set(inner)
    # the grid step feeds its group's latents; the unified parameter turns it (and stage 4) on
    grids_in = inner["latents-group-op"].inputs.artifacts["grids"].task_output_artifact
    assert grids_in.producer_task == "grids-group-op"
    enabled = inner["grids-group-op"].inputs.parameters["enabled"].component_input_parameter
    assert enabled.removeprefix("pipelinechannel--") == "unified"
    assert spec.root.input_definitions.parameters["unified"].default_value.bool_value is False
    merge_inputs = root["ingest-merge-op"].inputs.artifacts["parts"]
    assert merge_inputs.task_output_artifact.producer_task.startswith("for-loop")  # dsl.Collected fan-in
    tasks = {n: t for n, t in {**root, **inner}.items() if n not in loops}
    for task in tasks.values():
        component = spec.components[task.component_ref.name]
        assert component.executor_label in deployment.executors
    train = [n for n in tasks if n.startswith("train-stage-op")]
    assert len(train) == 4
    k8s = json_format.MessageToDict(platform.platforms["kubernetes"])["deploymentSpec"]["executors"]
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2

    for label, config in k8s.items():  # each executor's Kubernetes config parses strictly too
        assert label in deployment.executors
        json_format.ParseDict(config, k8s_pb2.KubernetesExecutorConfig())
    for name in train:  # the default cluster launcher: a small task that runs the stage as a TrainJob
        label = spec.components[tasks[name].component_ref.name].executor_label
        resources = deployment.executors[label].container.resources
        assert not resources.accelerator.resource_type and resources.resource_cpu_limit == "1"
        assert k8s[label]["pvcMount"][0]["mountPath"] == "/cache"  # inputs staged for the job's pods
        params = tasks[name].inputs.parameters
        assert params["launcher"].runtime_value.constant.string_value == "trainjob"
        settings = json.loads(params["trainjob_json"].runtime_value.constant.string_value)
        assert settings["pvc"] == "lumina-cache" and settings["runtime"] == "torch-distributed"
        assert settings["node_selector"] == {"nvidia.com/gpu.present": "true"}
        assert (
            params["nodes"].component_input_parameter.removeprefix("pipelinechannel--") == "train_nodes"
        )  # pipeline parameters
        assert (
            params["gpus_per_node"].component_input_parameter.removeprefix("pipelinechannel--")
            == "gpus_per_node"
        )
        assert (
            params["config_yaml"].component_input_parameter.removeprefix("pipelinechannel--")
            == "train_config_yaml"
        )  # any TrainConfig field
    first = [n for n in train if "base_model" in tasks[n].inputs.parameters]
    assert len(first) == 1  # the first stage starts from base_model, the others chain
    assert (
        tasks[first[0]]
        .inputs.parameters["base_model"]
        .component_input_parameter.removeprefix("pipelinechannel--")
        == "base_model"
    )
    assert inner["latents-group-op"].inputs.parameters["base_model"].component_input_parameter
    defaults = spec.root.input_definitions.parameters
    assert defaults["train_nodes"].default_value.number_value == 4
    assert defaults["gpus_per_node"].default_value.number_value == 8
    for task in tasks.values():  # every task, the train stages included, reaches the same MLflow and S3
        secrets = k8s[spec.components[task.component_ref.name].executor_label]["secretAsEnv"]
        envs = {kv["envVar"] for secret in secrets for kv in secret["keyToEnv"]}
        assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID"} <= envs
    for task in tasks.values():  # every pod logs JSON records for the cluster's log collector
        executor = deployment.executors[spec.components[task.component_ref.name].executor_label]
        env = {e.name: e.value for e in executor.container.env}
        assert env.get("LUMINA_LOG_FORMAT") == "json" and env.get("TQDM_DISABLE") == "1"
    assert tasks["register-op"].caching_options.enable_cache is False
    assert tasks["ingest-group-op"].retry_policy.max_retry_count == 2
    recaption = deployment.executors[
        spec.components[inner["recaption-group-op"].component_ref.name].executor_label
    ]
    assert recaption.container.resources.accelerator.resource_count == "1"  # a GPU per recaption task
    latents = deployment.executors[
        spec.components[inner["latents-group-op"].component_ref.name].executor_label
    ]
    assert latents.container.resources.accelerator.resource_count == "1"  # the VAE encoder on a GPU
    score = deployment.executors[spec.components[inner["score-group-op"].component_ref.name].executor_label]
    assert score.container.resources.resource_cpu_request == "2"
    stages = [
        t.inputs.parameters["stage"].runtime_value.constant.string_value
        for n, t in tasks.items()
        if n in train
    ]
    assert sorted(stages) == ["highres", "hq", "lowres", "unified"]
    (stage4,) = [tasks[n] for n in train if "enabled" in tasks[n].inputs.parameters]
    assert stage4.inputs.parameters["stage"].runtime_value.constant.string_value == "unified"
    assert stage4.inputs.parameters["enabled"].component_input_parameter.endswith("unified")
    assert stage4.inputs.artifacts["init_from"].task_output_artifact.producer_task in train  # after hq
    evaluate = tasks["evaluate-op"].inputs
    assert evaluate.artifacts["baseline"].task_output_artifact.producer_task in train  # panels before/after
    assert evaluate.parameters["compare_baseline"].component_input_parameter.endswith("unified")
    for name in train:  # a durable work folder on the cache PVC, keyed by run, and retries that resume
        params = tasks[name].inputs.parameters
        assert params["work_root"].runtime_value.constant.string_value == "/cache/runs"
        assert params["run_id"].runtime_value.constant.string_value == "{{$.pipeline_job_uuid}}"
        assert tasks[name].retry_policy.max_retry_count == 2
    for name in train:  # every stage reads the latent cache the per-group latent tasks wrote
        latents = tasks[name].inputs.artifacts["latents"].task_output_artifact
        assert latents.producer_task.startswith("for-loop") and latents.output_artifact_key.endswith("index")


@pytest.mark.slow
def test_pod_launcher_trains_in_the_task_pod_on_gpus(tmp_path):
    settings = tmp_path / "cluster.yaml"
    settings.write_text("train_launcher: pod\ngpus_per_train_task: 2\n")
    spec_doc, platform_doc = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", settings).read_text())
    executors = spec_doc["deploymentSpec"]["executors"]
    k8s = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = [label for label in executors if label.startswith("exec-train-stage-op")]
    assert len(train) == 4  # lowres, highres, hq, unified
    for label in train:
        accelerator = executors[label]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "2"
        assert k8s[label]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s[label]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert k8s[label]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    tasks = spec_doc["root"]["dag"]["tasks"]
    for name in (n for n in tasks if n.startswith("train-stage-op")):
        assert "launcher" not in tasks[name]["inputs"]["parameters"]  # the component's default: local


class _Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list] = []
    RESPONSES: ClassVar[dict] = {
        ("GET", "/apis/v2beta1/healthz"): {"multi_user": False},
        ("POST", "/apis/v2beta1/experiments"): {"experiment_id": "exp-1", "display_name": "lumina"},
        ("GET", "/apis/v2beta1/experiments"): {
            "experiments": [{"experiment_id": "exp-1", "display_name": "lumina"}]
        },
        ("POST", "/apis/v2beta1/runs"): {"run_id": "run-1", "display_name": "r", "state": "PENDING"},
        ("POST", "/apis/v2beta1/recurringruns"): {
            "recurring_run_id": "rr-1",
            "display_name": "lumina-retrain",
        },
        ("GET", "/apis/v2beta1/runs/run-1"): {"run_id": "run-1", "display_name": "r", "state": "SUCCEEDED"},
    }

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        path = self.path.split("?")[0]
        self.requests.append((self.command, path, body, dict(self.headers)))
        payload = self.RESPONSES.get((self.command, path))
        self.send_response(200 if payload is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(payload or {"error": "not found"}).encode())

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture()
def kfp_api():
    _Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.requests
    server.shutdown()
    server.server_close()


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipelines {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_submit_schedule_and_status_reach_the_api(kfp_api):
    host, requests = kfp_api
    out = _cli("run", "--host", host, "--token", "secret-token", "--source", "s3://bucket/raw")
    assert json.loads(out.stdout.strip().splitlines()[-1])["run_id"] == "run-1"
    run_post = next(json.loads(b) for m, p, b, _ in requests if (m, p) == ("POST", "/apis/v2beta1/runs"))
    assert run_post["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "lumina-pipeline"
    assert "kubernetes" in run_post["pipeline_spec"]["platform_spec"]["platforms"]
    assert run_post["runtime_config"]["parameters"]["source"] == "s3://bucket/raw"
    assert len(run_post["runtime_config"]["parameters"]["git_sha"]) >= 7  # lineage on cluster runs too
    assert (
        "group_size" not in run_post["runtime_config"]["parameters"]
    )  # the cluster's default, not the local one
    assert all(
        {k.lower(): v for k, v in h.items()}.get("authorization") == "Bearer secret-token"
        for *_, h in requests
    )
    requests.clear()
    out = _cli("schedule", "--host", host, "--cron", "0 0 3 * * 0", "--data-version", "dvc-abc")
    assert json.loads(out.stdout.strip().splitlines()[-1])["recurring_run_id"] == "rr-1"
    job = next(json.loads(b) for m, p, b, _ in requests if (m, p) == ("POST", "/apis/v2beta1/recurringruns"))
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
    params = job["runtime_config"]["parameters"]
    assert params["data_version"] == "dvc-abc" and len(params["git_sha"]) >= 7  # scheduled runs: lineage
    assert params["only_new_data"] is True  # a scheduled run on an unchanged source ends early
    spec = job["pipeline_spec"].get("pipeline_spec", job["pipeline_spec"])
    assert spec["pipelineInfo"]["name"] == "lumina-pipeline"
    out = _cli("status", "--host", host, "--run-id", "run-1")
    assert "SUCCEEDED" in out.stdout


def test_cli_errors_are_one_line(tmp_path, cli):
    proc = cli("pipelines.cli", "run", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "pipeline source not found" in proc.stderr
    proc = cli("pipelines.cli", "run", "--steps", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "LOWRES,HIGHRES,HQ" in proc.stderr
    for grid_cfg, message in (
        ("{1", "grid config is not valid JSON"),
        ('{"tier": "top"}', "unknown tier 'top'"),
    ):
        proc = cli(
            "pipelines.cli", "run", "--param", f"grid_config_json={grid_cfg}", "--out", str(tmp_path / "o")
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    bad_yaml, bad_rule = tmp_path / "bad.yaml", tmp_path / "rule.yaml"
    bad_yaml.write_text("rules: [1\n")
    bad_rule.write_text("rules:\n  val_loss: {better: sideways}\n")
    proc = cli("pipelines.cli", "run", "--gate", str(bad_yaml), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr
    proc = cli("pipelines.cli", "run", "--gate", str(bad_rule), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "invalid rules.val_loss.better" in proc.stderr
    proc = cli("pipelines.cli", "run", "--base-model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--base-model" in proc.stderr and "not found" in proc.stderr


@pytest.mark.slow
def test_local_run_registers_and_failing_gate_keeps_champion(tmp_path):
    from mlflow import MlflowClient

    from data_tools.synthetic import build_synthetic
    from pipelines.local import run_local

    build_synthetic(tmp_path / "raw" / "synthetic", n=48, size=128)
    eval_cfg = json.dumps(
        {"suites": ["synthetic"], "synthetic_size": 4, "heldout": 8, "panels": 1, "sampler": {"steps": 4}}
    )
    args = {
        "profile": "tiny",
        "model_name": "lumina-e2e",
        "lowres_steps": 12,
        "highres_steps": 4,
        "hq_steps": 4,
        "unified": True,  # the grid steps and the fourth stage
        "unified_steps": 4,
        "grid_config_json": json.dumps({"tier": "highres", "max_grids": 4}),
        "eval_config_json": eval_cfg,
        "train_config_yaml": "val_prompts: 2\n",  # each stage's compositional check, kept short
    }
    env_before = dict(os.environ)
    first = run_local(tmp_path / "raw" / "synthetic", tmp_path / "out", args)
    assert dict(os.environ) == env_before  # the run's MLflow URI and settings do not outlive it
    reg = first.registration
    assert reg["promoted"] and reg["aliases"] == ["challenger", "champion"], reg
    client = MlflowClient(tracking_uri=first.tracking_uri)
    version = client.get_model_version("lumina-e2e", reg["version"])
    for tag in (
        "dataset_hash",
        "captions_hash",
        "tiers_hash",
        "run.lowres",
        "run.highres",
        "run.hq",
        "run.unified",
        "run.evaluate",
        "git_sha",
        "metric.val_loss",
        "source_fingerprint",
    ):
        assert version.tags.get(tag), f"tag {tag} missing on the model version"
    assert client.get_run(version.tags["run.hq"]).data.params["stage"] == "hq"
    for stage in ("lowres", "highres", "hq", "unified"):  # each stage's held-out compositional scores
        metrics = client.get_run(version.tags[f"run.{stage}"]).data.metrics
        assert all(0.0 <= metrics[f"val_{k}"] <= 1.0 for k in ("colors", "presence", "counting", "position"))
    assert client.get_run(version.tags["run.unified"]).data.params["stage"] == "unified"
    grid_steps = sorted((tmp_path / "out").rglob("grids.json"))
    assert grid_steps and sum(json.loads(p.read_text())["grids"] for p in grid_steps) > 0
    for key in ("panel_canny_f1", "panel_mask_iou", "panel_canny_f1_before", "panel_mask_iou_before"):
        assert 0.0 <= reg["metrics"][key] <= 1.0, key  # the grid panels before / after the phase
    assert "model profile: `tiny`" in version.description and "| val_loss |" in version.description
    data_runs = client.search_runs([client.get_experiment_by_name("lumina-data").experiment_id])
    gates = {r.data.tags["step"]: r for r in data_runs}
    assert set(gates) == {"ingest", "recaption"} and all(r.data.tags["gate"] == "passed" for r in data_runs)
    assert gates["ingest"].data.tags["dataset_hash"] == version.tags["dataset_hash"]
    assert first.report is not None and "Evaluation of" in first.report.read_text()
    assert reg["metrics"]["val_loss"] == float(version.tags["metric.val_loss"])

    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"rules": {"val_loss": {"better": "lower", "max": 1e-6}}}))
    proc = _cli(
        "run",
        "--source",
        str(tmp_path / "raw" / "synthetic"),
        "--out",
        str(tmp_path / "out"),
        "--model-name",
        "lumina-e2e",
        "--steps",
        "2,2,2",
        "--no-unified",  # the fourth task passes the HQ model on: no before / after panels
        "--gate",
        str(gate),
        "--param",
        f"eval_config_json={eval_cfg}",
        "--param",
        "train_config_yaml=val_prompts: 2",
    )
    assert "not champion" in proc.stdout and "> max" in proc.stdout
    assert "held-out loss    : " in proc.stdout and "compositional    : presence " in proc.stdout
    assert "grid panels      : canny_f1 " in proc.stdout and "(before unified " not in proc.stdout
    assert "by stage         : colors " in proc.stdout and " -> " in proc.stdout
    assert "(at 128 px)" in proc.stdout  # the tiny stages are checked at one resolution (val_resolution)
    assert "SERVE_MODEL=models:/lumina-e2e/" in proc.stdout  # not champion: served by version
    champion = client.get_model_version_by_alias("lumina-e2e", "champion")
    challenger = client.get_model_version_by_alias("lumina-e2e", "challenger")
    assert str(champion.version) == reg["version"] and str(challenger.version) != reg["version"]
    assert not challenger.tags.get("run.unified")  # turned off: no unified stage run

    # a recurring run (only_new_data) on the unchanged source ends after the plan and says why
    third = run_local(tmp_path / "raw" / "synthetic", tmp_path / "out", {**args, "only_new_data": True})
    assert third.registration == {} and third.skipped.startswith("no new data: lumina-e2e version")
    assert f"version {challenger.version} was trained on this source" in third.skipped
    assert len(client.search_model_versions("name = 'lumina-e2e'")) == 2  # nothing registered again


def test_operator_mistakes_are_one_line_before_anything_runs(tmp_path, cli, s3, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for args, message in (
        (["run", "--host", dead, "--source", "s3://b/raw"], f"cannot reach Kubeflow Pipelines at {dead}"),
        (["status", "--host", dead], "cannot reach Kubeflow Pipelines"),
        (["run", "--host", "kfp.example.com"], "expected an http:// or https:// URL"),
        (["run", "--profile", "huge", "--out", str(tmp_path / "o")], "unknown model profile 'huge'"),
    ):
        proc = cli("pipelines.cli", *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    proc = cli("pipelines.cli", "run", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and f"cannot reach MLflow at {dead}" in proc.stderr
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    proc = cli("pipelines.cli", "run", "--source", "s3://lumina/nothing-here/", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "nothing under s3://lumina/nothing-here/" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("pipelines.cli", "run", "--out", str(blocker / "out"))
    assert proc.returncode == 2 and f"--out {blocker / 'out'}: not writable" in proc.stderr


@pytest.mark.slow
def test_a_failing_step_is_named_with_its_reason_and_log(tmp_path, cli):
    """Only corrupt images: the ingest gate fails; the CLI says which step, why and where the log is,
    in one line, instead of the task output and kfp's traceback."""
    source = tmp_path / "corrupt"
    source.mkdir()
    for i in range(3):
        (source / f"bad{i}.png").write_bytes(b"not a png " * i)
    proc = cli("pipelines.cli", "run", "--source", str(source), "--out", str(tmp_path / "out"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("error: step ingest-merge-op failed: GateFailed: ingest manifest failed")
    assert errors[0].endswith(f"(full log: {tmp_path / 'out' / 'pipeline.log'})")
    assert "Traceback" in (tmp_path / "out" / "pipeline.log").read_text()  # the details are kept there
    assert "Traceback" not in proc.stderr and "executor_output" not in proc.stdout
    assert "have no effect in the current local runner" not in proc.stderr  # kfp's per-task notices


def test_a_local_tiny_run_gets_the_embedded_default_tiers(tmp_path, cli, monkeypatch):
    """The embedded default (local, tiny) trains stage 2 on every image of its size and stage 3 on
    the best quarter (the paper's 10 % / 1 % leave a sample set too few images); a given
    ``tier_config_json`` wins, and a cluster run keeps the pipeline's own default."""
    import pipelines.local
    from common.errors import ConfigError
    from pipelines.cli import LOCAL_GROUP_SIZE, LOCAL_TIERS

    seen: dict = {}

    def stop(source, out, args, **_):
        seen.clear()
        seen.update(args)
        raise ConfigError("stopped before running")

    monkeypatch.setattr(pipelines.local, "run_local", stop)
    (tmp_path / "raw").mkdir()
    base = ("pipelines.cli", "run", "--source", str(tmp_path / "raw"), "--out", str(tmp_path / "o"))
    proc = cli(*base)
    assert proc.returncode == 2 and "stopped before running" in proc.stderr
    assert json.loads(seen["tier_config_json"]) == LOCAL_TIERS and seen["group_size"] == LOCAL_GROUP_SIZE
    given = json.dumps({"highres_ratio": 0.5, "hq_ratio": 0.1})
    cli(*base, "--param", f"tier_config_json={given}")
    assert seen["tier_config_json"] == given


def test_the_by_stage_line_says_where_the_stages_were_scored(tmp_path):
    """The summary's per-stage line reads each stage run's val_ scores and says whether they were
    sampled at one resolution (comparable) or each at its stage's own."""
    from mlflow import MlflowClient

    from pipelines.cli import stage_lines

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stages", artifact_location=(tmp_path / "artifacts").as_uri())

    def stage_run(size: str, colors: float, presence: float) -> str:
        run = client.create_run(experiment).info.run_id
        client.log_param(run, "val_resolution", size)
        client.log_metric(run, "val_colors", colors)
        client.log_metric(run, "val_presence", presence)
        return run

    client.create_registered_model("m")

    def version(*runs: str) -> str:
        tags = {f"run.{stage}": run for stage, run in zip(("lowres", "highres", "hq"), runs, strict=False)}
        return client.create_model_version("m", f"runs:/{runs[-1]}/model", tags=tags).version

    one = version(stage_run("128", 0.38, 0.12), stage_run("128", 0.6, 0.2))
    own = version(stage_run("None", 0.8, 0.4), stage_run("None", 0.5, 0.25), stage_run("None", 0.5, 0.25))
    assert stage_lines(uri, "m", one) == [
        "by stage         : colors 0.38 -> 0.60; presence 0.12 -> 0.20 (at 128 px)"
    ]
    assert stage_lines(uri, "m", own)[0].endswith(
        "presence 0.40 -> 0.25 -> 0.25 (at each stage's resolution)"
    )
    assert stage_lines(uri, "m", "99")[0].startswith("by stage         : not available (")
