"""The production pieces and hardening rules of the Helm chart `charts/lumina-sampler` (issue #14).

Offline, with the helm binary of `tests/test_chart.py` (its fixtures and its one render per ci values
file are shared): the optional objects (ServiceMonitor, KEDA ScaledObject, NetworkPolicy, the
`helm test` pod) render as configured; the ServiceMonitor and the ScaledObject validate against the
CRDs vendored under `tests/crds/` (prometheus-operator and KEDA, Apache-2.0); the pod gets
ephemeral-storage from its emptyDir sizeLimits, a preStop pause inside the grace period, a progress
deadline above the startup budget, torch threads from its CPUs, and the fetch credentials only where
the weights are fetched; the Ingress never publishes /metrics or /docs. Values that would weaken the
pod or contradict each other are refused by `values.schema.json` or by a one-line `fail` of the chart.
"""

# ruff: noqa: F811  (the shared fixtures helm, helm_env and rendered come from tests.test_chart)
from __future__ import annotations

import http.server
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.crd_schema import crd_validator, load_crd
from tests.test_chart import (  # noqa: F401  (the fixtures helm, helm_env, rendered are used by name)
    CHART,
    CI_VALUES,
    CRD_KINDS,
    NAMESPACE,
    RELEASE,
    SCHEMA_ERROR,
    Rendered,
    effective_values,
    env_map,
    helm,
    helm_env,
    rendered,
    template,
)

CRDS = Path(__file__).parent / "crds"
CRD_FILES = {
    "ServiceMonitor": ("monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com", "v1"),
    "ScaledObject": ("keda.sh_scaledobjects.yaml", "keda.sh", "v1alpha1"),
}
CI_IDS = [p.name for p in CI_VALUES]
# Paths of the server that must stay inside the cluster.
HIDDEN_PATHS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


@pytest.fixture(params=CI_IDS)
def r(request, rendered) -> Rendered:
    return rendered[request.param]


def quantity(text) -> float:
    """A Kubernetes quantity in base units (bytes / cores)."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(text))
    assert m, text
    units = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    units.update({s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))})
    return float(m.group(1)) * units[m.group(2)]


def write_values(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- CRD validation


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, tuple[str, jsonschema.Draft7Validator]]:
    """kind -> (apiVersion, validator of the served version's openAPIV3Schema)."""
    out = {}
    for kind, (filename, group, version) in CRD_FILES.items():
        crd = load_crd(CRDS / filename)
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        assert served["served"] and served["storage"]
        out[kind] = (f"{group}/{version}", crd_validator(served["schema"]["openAPIV3Schema"]))
    return out


def test_vendored_crds_carry_their_licences():
    readme = (CRDS / "README.md").read_text()
    for filename, _, _ in CRD_FILES.values():
        assert (CRDS / filename).stat().st_size < 1_000_000
        assert filename in readme
    for licence in ("LICENSE.prometheus-operator", "LICENSE.keda"):
        text = (CRDS / licence).read_text()
        assert "Apache License" in text and "Version 2.0" in text, licence
        assert licence in readme


def test_crd_objects_validate_against_their_crds(rendered, crd_validators):
    seen = set()
    for name, rend in rendered.items():
        for obj in rend.objects:
            if obj["kind"] not in CRD_KINDS:
                continue
            api_version, validator = crd_validators[obj["kind"]]
            assert obj["apiVersion"] == api_version, f"{name}: {obj['kind']} {obj['apiVersion']}"
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
            assert not errors, f"{name}: {obj['kind']}: " + "; ".join(errors)
            seen.add(obj["kind"])
    assert seen == CRD_KINDS, "every CRD kind is rendered by some ci file"


def test_crd_validation_catches_bad_objects(rendered, crd_validators):
    """The CRD validators reject a typo and a wrong type (so the test above can fail)."""
    rend = rendered["keda-servicemonitor-values.yaml"]
    for kind, (field, bad) in {
        "ServiceMonitor": ("endpoints", [{"port": "http", "intervall": "30s"}]),
        "ScaledObject": ("minReplicaCount", "two"),
    }.items():
        obj = yaml.safe_load(yaml.safe_dump(rend.one(kind)))
        crd_validators[kind][1].validate(obj)
        obj["spec"][field] = bad
        with pytest.raises(jsonschema.ValidationError):
            crd_validators[kind][1].validate(obj)


# ------------------------------------------------------------------------------ optional objects


def test_service_monitor_iff_enabled(r):
    sm_values = r.values["metrics"]["serviceMonitor"]
    monitors = r.of_kind("ServiceMonitor")
    if not sm_values["enabled"]:
        assert not monitors
        return
    (sm,) = monitors
    svc = r.one("Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == sm_values["interval"]
    assert sm_values["labels"].items() <= sm["metadata"]["labels"].items()


def test_scaled_object_scales_on_the_servers_queue_depth(r):
    from serving.metrics import ServerMetrics

    keda = r.values["keda"]
    scaled = r.of_kind("ScaledObject")
    if not keda["enabled"]:
        assert not scaled
        return
    (so,) = scaled
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": r.deployment["metadata"]["name"],
    }  # fmt: skip
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert "replicas" not in r.deployment["spec"] and not r.of_kind("HorizontalPodAutoscaler")
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert meta["serverAddress"] == keda["prometheus"]["serverAddress"]
    assert meta["threshold"] == keda["prometheus"]["queueDepthTarget"]
    # the gauge the query reads is the one the server exposes on /metrics
    metric = re.match(r"sum\(([a-z_]+)\{", meta["query"]).group(1)
    assert metric == "lumina_queue_depth"
    assert f"# TYPE {metric} gauge" in ServerMetrics().render()
    assert f'namespace="{NAMESPACE}"' in meta["query"] and r.deployment["metadata"]["name"] in meta["query"]
    if keda["behavior"]:
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == keda["behavior"]


def test_network_policy_admits_only_the_http_port(r):
    np_values = r.values["networkPolicy"]
    policies = r.of_kind("NetworkPolicy")
    if not np_values["enabled"]:
        assert not policies
        return
    (policy,) = policies
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == r.deployment["spec"]["selector"]["matchLabels"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {p["name"]: p["containerPort"] for p in r.server["ports"]} == {"http": 8080}
    peers = rule.get("from", [])
    assert peers[: len(np_values["ingressFrom"])] == np_values["ingressFrom"]
    if np_values["ingressFrom"] and r.values["tests"]["enabled"]:
        (test_pod,) = r.test_pods
        assert {"podSelector": {"matchLabels": {
            k: v for k, v in test_pod["metadata"]["labels"].items()
            if k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")
        }}} in peers  # fmt: skip
    egress = np_values["egress"]
    assert ("Egress" in spec["policyTypes"]) == egress["enabled"] and "Ingress" in spec["policyTypes"]
    if egress["enabled"]:
        rules = spec["egress"]
        dns = [r_ for r_ in rules if {"port": 53, "protocol": "UDP"} in r_.get("ports", [])]
        assert bool(dns) == egress["allowDNS"]
        for extra in egress["rules"]:
            assert extra in rules
    else:
        assert "egress" not in spec


def test_helm_test_pod_checks_readiness_through_the_service(r):
    pods = r.test_pods
    if not r.values["tests"]["enabled"]:
        assert not pods
        return
    (pod,) = pods
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    svc = r.one("Service")
    url = f"http://{svc['metadata']['name']}.{NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}/readyz"
    assert c["command"][:2] == ["python", "-c"] and c["command"][-1] == url
    assert c["image"] == r.server["image"], "the server's image: nothing else to pull"
    assert c["securityContext"] == r.server["securityContext"]
    assert spec["securityContext"] == r.pod["securityContext"]


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        body = b'{"status": "ready"}' if self.status == 200 else b'{"status": "loading"}'
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_helm_test_script_exits_non_zero_unless_ready(rendered):
    """The test pod's script, run here against a stand-in server: 0 on 200, 1 on 503 or no server."""
    (pod,) = rendered["default-values.yaml"].test_pods
    script = pod["spec"]["containers"][0]["command"][2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
    try:
        results = {}
        for status in (200, 503):
            _Handler.status = status
            proc = subprocess.run(
                [sys.executable, "-c", script, url], capture_output=True, text=True, timeout=30
            )
            results[status] = proc.returncode
            assert f"GET {url}: {status}" in proc.stdout, proc.stdout + proc.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert results == {200: 0, 503: 1}
    proc = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and f"GET {url}:" in proc.stderr


# ------------------------------------------------------------------------------------ pod details


def test_ephemeral_storage_matches_the_emptydir_size_limits(r):
    values = r.values
    containers = [r.server, *r.pod.get("initContainers", [])]
    if not values["ephemeralStorage"]["enabled"]:
        for c in containers:
            for kind in ("requests", "limits"):
                assert "ephemeral-storage" not in c.get("resources", {}).get(kind, {}), c["name"]
        return
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    disk = [
        v["emptyDir"] for v in volumes.values() if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    ]
    expected = sum(quantity(d["sizeLimit"]) for d in disk) + quantity(values["ephemeralStorage"]["overhead"])
    assert ("model-cache" in {n for n, v in volumes.items() if "emptyDir" in v}) == (
        values["modelCache"]["type"] == "emptyDir"
    )
    explicit = (values["resources"].get("requests") or {}).get("ephemeral-storage")
    for c in containers:
        res = c["resources"]
        request, limit = (
            quantity(res["requests"]["ephemeral-storage"]),
            quantity(res["limits"]["ephemeral-storage"]),
        )
        assert request <= limit, c["name"]
        if c is r.server and explicit:
            assert request == quantity(explicit) >= expected
        else:
            assert math.isclose(request, expected, rel_tol=1e-6) and math.isclose(
                limit, expected, rel_tol=1e-6
            )
    # /dev/shm is Memory: it counts against the memory limit, which must exceed it
    shm = volumes["dshm"]["emptyDir"]
    limit = r.server["resources"].get("limits", {}).get("memory")
    if limit and shm.get("sizeLimit"):
        assert quantity(limit) > quantity(shm["sizeLimit"])


def test_prestop_pause_fits_in_the_grace_period(r):
    shutdown = r.values["shutdown"]
    grace = r.pod["terminationGracePeriodSeconds"]
    if shutdown["preStopSleepSeconds"]:
        command = r.server["lifecycle"]["preStop"]["exec"]["command"]
        assert command == ["sleep", str(shutdown["preStopSleepSeconds"])]
    else:
        assert "lifecycle" not in r.server
    assert grace >= shutdown["preStopSleepSeconds"] + shutdown["drainSeconds"]


def test_progress_deadline_covers_the_startup_budget(r):
    deadline = r.deployment["spec"]["progressDeadlineSeconds"]
    assert deadline == r.values["progressDeadlineSeconds"]
    probe = r.server["startupProbe"]
    budget = probe["initialDelaySeconds"] + probe["periodSeconds"] * probe["failureThreshold"]
    if r.pod.get("initContainers"):
        budget += r.values["model"]["fetch"]["budgetSeconds"]
    assert deadline >= budget


def test_torch_threads_follow_the_cpu_limit_or_request(r):
    resources = r.values["resources"]
    env = env_map(r.server)
    if (resources.get("limits") or {}).get("cpu"):
        expected = "limits.cpu"
    elif (resources.get("requests") or {}).get("cpu"):
        expected = "requests.cpu"
    else:
        assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        ref = env[name]["valueFrom"]["resourceFieldRef"]
        assert ref == {"containerName": "sampler", "resource": expected, "divisor": "1"}, name


def test_fetch_credentials_only_where_the_weights_are_fetched(r):
    """The server reads only its bearer token when the init container fetches (it then resolves the
    source from the cache's marker, see storage/staging.py); else it fetches and needs the rest."""
    values = r.values
    creds = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} if values["s3"]["existingSecret"] else set()
    if values["mlflow"]["existingSecret"]:
        creds |= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    server = set(env_map(r.server))
    if values["model"]["fetch"]["enabled"]:
        (init,) = r.pod["initContainers"]
        assert creds <= set(env_map(init))
        assert not creds & server
    else:
        assert creds <= server
    assert ("LUMINA_AUTH_TOKEN" in server) == bool(values["auth"]["existingSecret"])


def _published(path: str, path_type: str, target: str) -> bool:
    """Whether an Ingress path serves `target`, as Kubernetes Prefix semantics or as a plain string
    prefix (how some controllers read ImplementationSpecific)."""
    if path_type == "Exact":
        return target == path
    elements = [p for p in path.split("/") if p]
    if target.split("/")[1 : len(elements) + 1] == elements:
        return True
    return path_type == "ImplementationSpecific" and target.startswith(path)


def test_ingress_never_publishes_metrics_or_docs(r):
    for ing in r.of_kind("Ingress"):
        published = [
            (p["path"], p["pathType"]) for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]
        ]
        assert ("/v1", "Prefix") in published
        for path, path_type in published:
            for hidden in HIDDEN_PATHS:
                assert not _published(path, path_type, hidden), (
                    f"{r.source}: {path} ({path_type}) publishes {hidden}"
                )


def test_defaults_refuse_what_the_pod_must_not_do():
    """The chart's own values: one GPU, a seccomp profile, non-root ids, ingress paths explicit."""
    values = effective_values(CHART / "ci" / "default-values.yaml")
    assert values["gpu"]["count"] == 1
    assert values["podDisruptionBudget"]["minAvailable"] is None
    for path in values["ingress"]["hosts"][0]["paths"]:
        assert path["path"] != "/" or path["pathType"] == "Exact"


# --------------------------------------------------------------------------- refused values


SECRET_REF = "    valueFrom:\n      secretKeyRef:\n        name: s\n        key: k\n"

# case -> (values, text that the schema error names)
SCHEMA_REFUSES = {
    # security contexts
    "pod-seccomp-unconfined": (
        "podSecurityContext:\n  seccompProfile:\n    type: Unconfined\n",
        "podSecurityContext.seccompProfile.type",
    ),
    "container-seccomp-unconfined": (
        "securityContext:\n  seccompProfile:\n    type: Unconfined\n",
        "securityContext.seccompProfile.type",
    ),
    "container-apparmor-unconfined": (
        "securityContext:\n  appArmorProfile:\n    type: Unconfined\n",
        "securityContext.appArmorProfile.type",
    ),
    "pod-sysctls": (
        "podSecurityContext:\n  sysctls:\n    - name: net.core.somaxconn\n      value: '1024'\n",
        "sysctls",
    ),
    "pod-run-as-group-root": ("podSecurityContext:\n  runAsGroup: 0\n", "podSecurityContext.runAsGroup"),
    "container-run-as-group-root": ("securityContext:\n  runAsGroup: 0\n", "securityContext.runAsGroup"),
    "pod-fs-group-root": ("podSecurityContext:\n  fsGroup: 0\n", "podSecurityContext.fsGroup"),
    "pod-run-as-user-root": ("podSecurityContext:\n  runAsUser: 0\n", "podSecurityContext.runAsUser"),
    "container-run-as-user-root": ("securityContext:\n  runAsUser: 0\n", "securityContext.runAsUser"),
    "pod-run-as-non-root-false": (
        "podSecurityContext:\n  runAsNonRoot: false\n",
        "podSecurityContext.runAsNonRoot",
    ),
    "container-unmasked-proc": ("securityContext:\n  procMount: Unmasked\n", "securityContext.procMount"),
    "container-add-capability": (
        "securityContext:\n  capabilities:\n    add: [NET_ADMIN]\n",
        "securityContext.capabilities.add",
    ),
    # volumes and mounts
    "host-path-volume": (
        "extraVolumes:\n  - name: host\n    hostPath:\n      path: /var/run/docker.sock\n",
        "extraVolumes.0",
    ),
    "volume-named-like-the-charts": (
        "extraVolumes:\n  - name: tmp\n    emptyDir: {}\n",
        "extraVolumes.0.name",
    ),
    **{
        f"model-dir-{name}": (f"model:\n  dir: {path}\n", "model.dir")
        for name, path in {
            "root": "/",
            "app": "/app",
            "app-sub": "/app/models",
            "venv": "/opt/venv",
            "opt": "/opt",
            "usr": "/usr/local/models",
            "etc": "/etc",
            "proc": "/proc",
            "sys": "/sys",
            "dev": "/dev",
            "lib": "/lib",
            "bin": "/bin",
            "dotdot": "/models/../app",
        }.items()
    },
    **{
        f"mount-over-{name}": (
            "extraVolumes:\n  - name: w\n    emptyDir: {}\n"
            f"extraVolumeMounts:\n  - name: w\n    mountPath: {path}\n",
            "extraVolumeMounts.0.mountPath",
        )
        for name, path in {
            "root": "/",
            "app": "/app",
            "venv-site-packages": "/opt/venv/lib/python3.11/site-packages",
            "usr": "/usr",
            "bin": "/bin",
            "lib": "/lib",
            "etc": "/etc/ssl",
            "proc": "/proc",
            "sys": "/sys",
            "dev-shm": "/dev/shm",
            "service-account": "/var/run/secrets/kubernetes.io",
        }.items()
    },
    # credentials in extraEnv
    "env-auth-token-lowercase": ("extraEnv:\n  - name: lumina_auth_token\n    value: x\n", "extraEnv.0"),
    "env-second-auth-token": ("extraEnv:\n  - name: LUMINA_AUTH_TOKEN\n" + SECRET_REF, "extraEnv.0.name"),
    "env-hf-token-inline": ("extraEnv:\n  - name: HF_TOKEN\n    value: hf_x\n", "extraEnv.0"),
    "env-hub-token-inline": ("extraEnv:\n  - name: HUGGING_FACE_HUB_TOKEN\n    value: hf_x\n", "extraEnv.0"),
    "env-hf-token-configmap": (
        "extraEnv:\n  - name: HF_TOKEN\n    valueFrom:\n"
        "      configMapKeyRef:\n        name: c\n        key: k\n",
        "extraEnv.0",
    ),
    "env-aws-session-token": ("extraEnv:\n  - name: AWS_SESSION_TOKEN\n    value: x\n", "extraEnv.0"),
    "env-aws-any": ("extraEnv:\n  - name: aws_role_arn\n    value: arn:aws:iam::1:role/x\n", "extraEnv.0"),
    "env-mlflow-password": (
        "extraEnv:\n  - name: MLFLOW_TRACKING_PASSWORD\n" + SECRET_REF,
        "extraEnv.0.name",
    ),
    "env-mlflow-token-inline": ("extraEnv:\n  - name: mlflow_tracking_token\n    value: x\n", "extraEnv.0"),
    "env-override-model-source": (
        "extraEnv:\n  - name: LUMINA_MODEL_SOURCE\n    value: /x\n",
        "extraEnv.0.name",
    ),
    "env-override-device-lowercase": (
        "extraEnv:\n  - name: lumina_device\n    value: cpu\n",
        "extraEnv.0.name",
    ),
    "env-override-threads": ("extraEnv:\n  - name: OMP_NUM_THREADS\n    value: '64'\n", "extraEnv.0.name"),
    "env-value-and-value-from": (
        "extraEnv:\n  - name: FOO\n    value: x\n" + SECRET_REF,
        "extraEnv.0",
    ),
    # disruption budget, GPUs, images, ingress
    "pdb-both-fields": (
        "podDisruptionBudget:\n  enabled: true\n  minAvailable: 1\n  maxUnavailable: 1\n",
        "podDisruptionBudget",
    ),
    "pdb-max-unavailable-zero": (
        "podDisruptionBudget:\n  maxUnavailable: 0\n",
        "podDisruptionBudget.maxUnavailable",
    ),
    "pdb-min-available-100-percent": (
        "podDisruptionBudget:\n  minAvailable: 100%\n",
        "podDisruptionBudget.minAvailable",
    ),
    "two-gpus": ("gpu:\n  count: 2\n", "gpu.count"),
    "short-digest": ("image:\n  digest: sha256:abc\n", "image.digest"),
    "latest-with-digest": ("image:\n  tag: latest@sha256:" + "a" * 64 + "\n", "image.tag"),
    "ingress-root-prefix": (
        "ingress:\n  enabled: true\n  hosts:\n    - host: a.example.com\n      paths:\n"
        "        - path: /\n          pathType: Prefix\n",
        "ingress.hosts.0.paths.0",
    ),
    "ingress-metrics": (
        "ingress:\n  enabled: true\n  hosts:\n    - host: a.example.com\n      paths:\n"
        "        - path: /metrics\n          pathType: Exact\n",
        "ingress.hosts.0.paths.0.path",
    ),
    "ingress-docs-prefix": (
        "ingress:\n  enabled: true\n  hosts:\n    - host: a.example.com\n      paths:\n"
        "        - path: /doc\n          pathType: ImplementationSpecific\n",
        "ingress.hosts.0.paths.0",
    ),
    "ingress-regex": (
        "ingress:\n  enabled: true\n  hosts:\n    - host: a.example.com\n      paths:\n"
        "        - path: /(.*)\n          pathType: ImplementationSpecific\n",
        "ingress.hosts.0.paths.0.path",
    ),
    "keda-scale-to-zero": ("keda:\n  enabled: true\n  minReplicaCount: 0\n", "keda.minReplicaCount"),
    "service-monitor-bad-interval": (
        "metrics:\n  serviceMonitor:\n    enabled: true\n    interval: 30 seconds\n",
        "metrics.serviceMonitor.interval",
    ),
    "network-policy-unknown-peer": (
        "networkPolicy:\n  enabled: true\n  ingressFrom:\n    - namespace: monitoring\n",
        "networkPolicy.ingressFrom.0",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses(helm, helm_env, tmp_path, case):
    text, field = SCHEMA_REFUSES[case]
    proc = template(helm, helm_env, write_values(tmp_path, case, text))
    assert proc.returncode != 0, f"{case}: helm template accepted\n{text}"
    assert SCHEMA_ERROR in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr


RWO_PVC = "modelCache:\n  type: pvc\n  pvc:\n    accessModes: [ReadWriteOnce]\n"

# case -> (values, the chart's one-line message)
CHART_REFUSES = {
    "rwo-cache-two-replicas": (
        RWO_PVC + "replicaCount: 2\n",
        "a ReadWriteOnce model cache claim serves one pod",
    ),
    "rwo-cache-autoscaling": (
        RWO_PVC + "autoscaling:\n  enabled: true\n  minReplicas: 1\n  maxReplicas: 3\n",
        "a ReadWriteOnce model cache claim serves one pod",
    ),
    "rwop-cache-keda": (
        "modelCache:\n  type: pvc\n  pvc:\n    accessModes: [ReadWriteOncePod]\nkeda:\n  enabled: true\n",
        "a ReadWriteOnce model cache claim serves one pod",
    ),
    "pdb-min-available-equals-replicas": (
        "replicaCount: 2\npodDisruptionBudget:\n  minAvailable: 2\n",
        "podDisruptionBudget.minAvailable (2) must be below the replica count (2)",
    ),
    "pdb-min-available-above-hpa-min": (
        "modelCache:\n  pvc:\n    accessModes: [ReadWriteMany]\n"
        "autoscaling:\n  enabled: true\n  minReplicas: 2\n  maxReplicas: 4\n"
        "podDisruptionBudget:\n  minAvailable: 3\n",
        "podDisruptionBudget.minAvailable (3) must be below the replica count (2)",
    ),
    "grace-below-prestop-and-drain": (
        "terminationGracePeriodSeconds: 30\nshutdown:\n  preStopSleepSeconds: 10\n  drainSeconds: 30\n",
        "terminationGracePeriodSeconds (30) must be >= shutdown.preStopSleepSeconds + "
        "shutdown.drainSeconds (40)",
    ),
    "progress-deadline-below-startup": (
        "progressDeadlineSeconds: 600\n",
        "progressDeadlineSeconds (600) must be >= the startup budget (1205 s",
    ),
    "explicit-ephemeral-too-small": (
        "resources:\n  requests:\n    ephemeral-storage: 10Gi\n",
        "resources.requests.ephemeral-storage (10Gi) is smaller than the emptyDir sizeLimits",
    ),
    "unbounded-tmp": (
        "tmp:\n  sizeLimit: null\n",
        "tmp.sizeLimit must be set while ephemeralStorage.enabled",
    ),
    "shm-above-memory-limit": (
        "shm:\n  sizeLimit: 32Gi\n",
        "resources.limits.memory (32Gi) must be larger than shm.sizeLimit (32Gi)",
    ),
    "hpa-and-keda": (
        "autoscaling:\n  enabled: true\nkeda:\n  enabled: true\n",
        "autoscaling.enabled and keda.enabled are exclusive",
    ),
    "env-twice": (
        "extraEnv:\n  - name: LOG_FORMAT\n    value: a\n  - name: log_format\n    value: b\n",
        "extraEnv: log_format is set twice",
    ),
    "digest-twice": (
        f"image:\n  tag: 0.1.0@sha256:{'b' * 64}\n  digest: sha256:{'a' * 64}\n",
        "set the digest in image.digest or in image.tag",
    ),
}


@pytest.mark.parametrize("case", sorted(CHART_REFUSES))
def test_chart_refuses(helm, helm_env, tmp_path, case):
    text, message = CHART_REFUSES[case]
    proc = template(helm, helm_env, write_values(tmp_path, case, text))
    assert proc.returncode != 0, f"{case}: helm template accepted\n{text}"
    assert SCHEMA_ERROR not in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert message in error, "the message is on one line: " + proc.stderr


def test_allowed_values_still_render(helm, helm_env, tmp_path):
    """What the rules must keep allowing: a digest, a secret-backed HF token, harmless env named like
    tokens, "/" as an Exact ingress path, a mount under /tmp or /mnt, a RWX cache with several pods."""
    digest = "sha256:" + "c" * 64
    text = f"""
image:
  digest: {digest}
extraEnv:
  - name: HF_TOKEN
{SECRET_REF}  - name: TOKENIZERS_PARALLELISM
    value: "false"
  - name: LUMINA_LIMIT_CONCURRENCY
    value: "8"
  - name: POD_IP
    valueFrom:
      fieldRef:
        fieldPath: status.podIP
extraVolumes:
  - name: weights
    persistentVolumeClaim:
      claimName: w
extraVolumeMounts:
  - name: weights
    mountPath: /mnt/weights
    readOnly: true
modelCache:
  type: pvc
  pvc:
    accessModes: [ReadWriteMany]
replicaCount: 3
podDisruptionBudget:
  minAvailable: 2
ingress:
  enabled: true
  hosts:
    - host: a.example.com
      paths:
        - path: /
          pathType: Exact
        - path: /v1
          pathType: ImplementationSpecific
"""
    proc = template(helm, helm_env, write_values(tmp_path, "allowed", text))
    assert proc.returncode == 0, proc.stderr
    rend = Rendered(proc.stdout, {}, "allowed")
    assert rend.server["image"] == f"lumina-pipeline@{digest}"
    assert rend.deployment["metadata"]["labels"]["app.kubernetes.io/version"] == "0.1.0"
    assert rend.deployment["spec"]["replicas"] == 3
    assert rend.one("PodDisruptionBudget")["spec"] == {
        "minAvailable": 2, "selector": rend.deployment["spec"]["selector"],
    }  # fmt: skip


def test_tag_with_digest_renders(rendered):
    rend = rendered["networkpolicy-values.yaml"]
    tag = rend.values["image"]["tag"]
    assert re.fullmatch(r"[\w.-]+@sha256:[0-9a-f]{64}", tag)
    assert rend.server["image"] == f"{rend.values['image']['repository']}:{tag}"
    assert rend.deployment["metadata"]["labels"]["app.kubernetes.io/version"] == tag.split("@")[0]


def test_pdb_defaults_to_max_unavailable_one(rendered):
    pdb = rendered["default-values.yaml"].one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
