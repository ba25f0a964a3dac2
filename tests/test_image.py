"""The container image: the Dockerfile read statically, and the image built and run.

Static checks (no container engine needed, fast): a plain ``docker build .`` needs only what a clean
clone has; the runtime stage copies every package of pyproject.toml and the repository data that
runtime code reads; the build arguments for private indexes and an offline wheelhouse reach every
pip call; the runtime stage carries no compiler (DeepSpeed's one needed op is prebuilt) and no git;
dumb-init is PID 1.

Built and run (``slow``): builds the CPU image with ``make image`` (through tools/image/build.sh:
the Dockerfile's default base when it can be pulled, else the offline Debian bases from
tools/image/make_base.sh), then checks it from the outside: the runtime user, the imports the
components and the server need, no compiler, DeepSpeed's prebuilt op, dumb-init as PID 1 forwarding
SIGTERM, the server answering /healthz, /readyz and a real generation with a tiny model made inside
the container, the image's own HEALTHCHECK command, and the default command failing fast (exit 2)
when no model is configured.

The built-image tests are skipped, with the reason, when no container engine can be reached or
started (``docker info`` fails and dockerd cannot be started: not root, no dockerd, ...) or no base
image can be had; LUMINA_SKIP_IMAGE_TEST=1 skips them on purpose. The first build takes minutes;
later ones reuse the engine's layer cache (seconds).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "image"
ENGINE = os.environ.get("CONTAINER_ENGINE", "docker")
IMAGE = os.environ.get("LUMINA_TEST_IMAGE", "lumina-pipeline:0.1.0")
UID = "10001"
# No proxy for the loopback port the container is published on.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

MAKE_TINY = (
    "from model.checkpoint import build_pipeline, save_pipeline; "
    "save_pipeline(build_pipeline('tiny', seed=0, zero_init=False), '/tmp/tiny')"
)
SERVE_TINY = (
    f'python -c "{MAKE_TINY}" && exec python -m serving --host 0.0.0.0 --port 8080 '
    "--model /tmp/tiny --model-dir /tmp/serve-cache --defaults-file serving/profiles/tiny.yaml --device cpu"
)


def _run(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def image() -> str:
    if os.environ.get("LUMINA_SKIP_IMAGE_TEST") == "1":
        pytest.skip("LUMINA_SKIP_IMAGE_TEST=1")
    if shutil.which(ENGINE) is None:
        pytest.skip(f"no container engine: {ENGINE} CLI not found")
    if os.environ.get("CI") and _run(ENGINE, "info", timeout=60).returncode != 0:
        # CI keeps its time budget: it uses an engine that is already running, never starts one.
        pytest.skip(f"CI: no running container engine ({ENGINE} info fails); not started in CI")
    engine = _run(str(TOOLS / "ensure_engine.sh"), timeout=180)
    if engine.returncode != 0:
        pytest.skip(f"no container engine can be reached or started: {_tail(engine.stderr, 5)}")
    env = {**os.environ, "IMAGE": IMAGE, "CONTAINER_ENGINE": ENGINE}
    build = _run(str(TOOLS / "build.sh"), cwd=ROOT, env=env, timeout=3600)
    if build.returncode == 3:
        pytest.skip(f"the image cannot be built here: {_tail(build.stderr, 5)}")
    assert build.returncode == 0, f"image build failed:\n{_tail(build.stdout + build.stderr, 60)}"
    return IMAGE


def _get(url: str) -> tuple[int, bytes]:
    try:
        with _HTTP.open(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_for(url: str, status: int, container: str, deadline_s: float) -> float:
    """Poll until the URL answers `status`; fail at once (with the logs) if the container stops."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < deadline_s:
        try:
            last = _get(url)[0]
        except OSError as exc:  # not listening yet
            last = exc
        if last == status:
            return time.monotonic() - start
        state = _run(ENGINE, "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", container)
        if state.stdout.split()[:1] != ["true"]:
            logs = _run(ENGINE, "logs", container)
            pytest.fail(f"container stopped ({state.stdout.strip()}):\n{_tail(logs.stdout + logs.stderr)}")
        time.sleep(1)
    logs = _run(ENGINE, "logs", container)
    pytest.fail(f"{url} never answered {status} (last: {last!r}):\n{_tail(logs.stdout + logs.stderr)}")


@pytest.mark.slow
def test_user_python_and_imports(image):
    probe = _run(
        ENGINE,
        "run",
        "--rm",
        image,
        "sh",
        "-c",
        "id -u && command -v python && python -c 'import sys, torch; "
        "print(sys.version.split()[0], torch.__version__)' && python -c \"import components.train.trainer, "
        'pipelines.lumina_pipeline, serving.app" && touch /cache/ok /models/ok && echo ok',
        timeout=300,
    )
    assert probe.returncode == 0, _tail(probe.stdout + probe.stderr)
    uid, python, versions, ok = probe.stdout.strip().splitlines()[-4:]
    assert uid == UID
    assert python == "/opt/venv/bin/python"
    py, torch_version = versions.split()
    assert py.startswith("3.11."), py
    assert torch_version == "2.13.0+cpu", torch_version
    assert ok == "ok"


@pytest.mark.slow
def test_no_compiler_prebuilt_deepspeed_op_and_revision(image):
    """No compiler or git in the image; DeepSpeed's CPU shared-memory op loads prebuilt (a JIT build
    would need g++) and nothing lands in TORCH_EXTENSIONS_DIR; the commit is a label and env var."""
    probe = _run(
        ENGINE,
        "run",
        "--rm",
        image,
        "sh",
        "-c",
        "for c in g++ gcc cc c++ git; do if command -v $c; then echo found $c; exit 1; fi; done; "
        "python -c 'from deepspeed.comm.torch import build_shm_op; op = build_shm_op(); "
        'assert op is not None and op.__file__.endswith(".so"), op; print(op.__file__)\' '
        '&& ls -A "$TORCH_EXTENSIONS_DIR" 2>/dev/null | wc -l && echo "$LUMINA_GIT_SHA"',
        timeout=300,
    )
    assert probe.returncode == 0, _tail(probe.stdout + probe.stderr)
    so, extensions, sha = probe.stdout.strip().splitlines()[-3:]
    assert "/opt/venv/" in so and "deepspeed_shm_comm" in so, so
    assert extensions == "0"
    label = _run(
        ENGINE, "inspect", "-f", '{{index .Config.Labels "org.opencontainers.image.revision"}}', image
    ).stdout.strip()
    assert label == sha and label != "", (label, sha)


@pytest.mark.slow
def test_dumb_init_is_pid1_and_forwards_sigterm(image):
    """`sleep` as PID 1 would ignore SIGTERM (docker stop would wait out its timeout and SIGKILL);
    under dumb-init the signal reaches it and the container stops at once with 143."""
    name = f"lumina-image-test-{uuid.uuid4().hex[:8]}"
    started = _run(ENGINE, "run", "-d", "--name", name, image, "sleep", "300")
    assert started.returncode == 0, started.stderr
    try:
        pid1 = _run(ENGINE, "exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert pid1[:2] == ["/opt/venv/bin/dumb-init", "--"], pid1
        start = time.monotonic()
        assert _run(ENGINE, "stop", "-t", "20", name).returncode == 0
        assert time.monotonic() - start < 10
        code = _run(ENGINE, "inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "143", code  # 128 + SIGTERM, passed on by dumb-init
    finally:
        _run(ENGINE, "rm", "-f", name)


@pytest.mark.slow
def test_server_health_ready_and_generate(image):
    name = f"lumina-image-test-{uuid.uuid4().hex[:8]}"
    started = _run(
        ENGINE, "run", "-d", "--name", name, "-p", "127.0.0.1::8080", image, "sh", "-c", SERVE_TINY
    )
    assert started.returncode == 0, started.stderr
    try:
        port = _run(ENGINE, "port", name, "8080/tcp").stdout.strip().splitlines()[0].rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/healthz", 200, name, deadline_s=180)
        status, body = _get(f"{base}/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        _wait_for(f"{base}/readyz", 200, name, deadline_s=120)

        request = urllib.request.Request(
            f"{base}/v1/generate",
            data=json.dumps(
                {"prompt": "a red cat", "height": 64, "width": 96, "steps": 2, "seed": 7}
            ).encode(),
            headers={"content-type": "application/json"},
        )
        with _HTTP.open(request, timeout=120) as response:
            assert response.status == 200
            assert response.headers["content-type"] == "image/png"
            png = response.read()
        from PIL import Image

        assert Image.open(io.BytesIO(png)).size == (96, 64)

        # The image's own HEALTHCHECK command, run inside the container.
        check = json.loads(_run(ENGINE, "inspect", "-f", "{{json .Config.Healthcheck.Test}}", name).stdout)
        assert check[0] == "CMD-SHELL", check
        inside = _run(ENGINE, "exec", name, "sh", "-c", check[1], timeout=60)
        assert inside.returncode == 0, inside.stderr
        assert _run(ENGINE, "exec", name, "id", "-u").stdout.strip() == UID
    finally:
        _run(ENGINE, "rm", "-f", name)


@pytest.mark.slow
def test_default_command_without_model_exits_2(image):
    """No model configured: the server logs why and exits 2 (so Kubernetes shows the error)."""
    name = f"lumina-image-test-{uuid.uuid4().hex[:8]}"
    try:
        run = _run(ENGINE, "run", "--name", name, image, timeout=180)
        assert run.returncode == 2, _tail(run.stdout + run.stderr)
        assert "no model source" in run.stdout + run.stderr
    finally:
        _run(ENGINE, "rm", "-f", name)


# ------------------------------------------------------------------ the Dockerfile, read statically

DOCKERFILE = ROOT / "Dockerfile"
COMPILERS = ("g++", "gcc", "cc", "c++", "clang", "build-essential")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages(text: str | None = None) -> list[dict]:
    """The build stages in order: {"base", "name", "body": [(INSTRUCTION, args), ...]}; the ARGs
    before the first FROM are stage ``-1``'s body under the name ``global``."""
    stages = [{"base": None, "name": "global", "body": []}]
    for word, args in _instructions(DOCKERFILE.read_text() if text is None else text):
        if word == "FROM":
            parts = [p for p in args.split() if not p.startswith("--")]
            name = parts[2] if len(parts) == 3 and parts[1].lower() == "as" else None
            stages.append({"base": parts[0], "name": name, "body": []})
        else:
            stages[-1]["body"].append((word, args))
    return stages


def _chain(stages: list[dict], stage: dict) -> list[dict]:
    """The stage and the named stages it is built FROM, nearest first."""
    named = {s["name"]: s for s in stages if s["name"]}
    chain = [stage]
    while chain[-1]["base"] in named:
        chain.append(named[chain[-1]["base"]])
    return chain


def _runtime() -> dict:
    return _stages()[-1]


def _copy_sources(args: str) -> list[str]:
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1]


def _pip_calls(script: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"pip install[^;&|]*", script)]


def _packages() -> list[str]:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    return sorted({p.rstrip("*").rstrip(".") for p in include if "." not in p.rstrip("*").rstrip(".")})


def _git(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return _run("git", *args, cwd=ROOT, timeout=60)


def test_every_copy_source_is_in_a_clean_clone():
    """`docker build .` from a fresh clone: every COPY source (any stage) holds a file git keeps,
    i.e. committed or at least not ignored (.whl/ is a committed folder with its README.md)."""
    missing = []
    for stage in _stages():
        for word, args in stage["body"]:
            if word not in ("COPY", "ADD") or "--from" in args:
                continue
            for src in _copy_sources(args):
                kept = _git("ls-files", "--cached", "--others", "--exclude-standard", "--", src).stdout
                if not kept.strip():
                    missing.append(src)
    assert not missing, f"COPY sources a clean clone does not have (missing or git-ignored): {missing}"


def test_whl_folder_is_committed_but_its_inputs_are_ignored():
    assert (ROOT / ".whl" / "README.md").is_file()
    assert _git("check-ignore", "-q", ".whl/README.md").returncode == 1, ".whl/README.md is git-ignored"
    for local_input in (".whl/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", ".whl/ca/proxy.crt"):
        assert _git("check-ignore", "-q", "--no-index", local_input).returncode == 0, local_input


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignored = {
        line.strip().strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for stage in _stages():
        for word, args in stage["body"]:
            if word == "COPY" and "--from" not in args:
                for src in _copy_sources(args):
                    assert src.strip("./") not in ignored, f"{src} is copied but .dockerignore drops it"


def test_runtime_copies_every_package_and_the_data_code_reads():
    """The runtime stage copies each package of pyproject.toml's packages.find include (a new package
    cannot be forgotten), and every top-level path that package code reads as
    ``Path(__file__).resolve().parents[k] / "name"`` of the repository root (benchmarks/ ...)."""
    copied = set()
    for word, args in _runtime()["body"]:
        if word == "COPY" and "--from" not in args:
            copied |= {src.strip("./").split("/")[0] for src in _copy_sources(args)}
    packages = _packages()
    assert "common" in packages and "storage" in packages
    assert not set(packages) - copied, f"packages not copied into the image: {set(packages) - copied}"

    read = set()
    pattern = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d)\]\s*/\s*[\"']([^\"'/]+)")
    for package in packages:
        for py in (ROOT / package).rglob("*.py"):
            for k, name in pattern.findall(py.read_text(errors="replace")):
                if py.resolve().parents[int(k)] == ROOT and (ROOT / name).exists():
                    read.add(name)
    assert "benchmarks" in read
    assert not read - copied, f"repository data read at run time but not copied: {read - copied}"


def test_build_args_for_private_indexes_and_a_wheelhouse():
    """PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST are build-stage ARGs without defaults
    (pip reads them from the environment of every RUN); no pip call overrides them except torch's
    own --index-url, none runs --isolated; WHEELHOUSE is an ARG; header and README document them."""
    build = next(s for s in _stages() if s["name"] == "build")
    args = {a.split("=")[0]: a for w, a in build["body"] if w == "ARG"}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        assert args.get(name) == name, f"build stage needs `ARG {name}` (no default): {args.get(name)}"
    assert "WHEELHOUSE" in args
    calls = [c for w, a in build["body"] if w == "RUN" for c in _pip_calls(a)]
    assert len(calls) >= 4, calls
    for call in calls:
        assert "--isolated" not in call, call
        if "--index-url" in call or "-i " in call:
            assert '--index-url "$TORCH_INDEX_URL"' in call, call
    header = DOCKERFILE.read_text().split("\nARG ")[0]
    readme = (ROOT / "README.md").read_text()
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "WHEELHOUSE=.whl"):
        assert name in header, f"{name} not documented in the Dockerfile header"
        assert name in readme, f"{name} not documented in README.md"


@pytest.mark.parametrize(
    ("wheelhouse", "expected"),
    [
        ("", None),
        (".whl", "{tmp}/wheels"),
        (".whl/wheelhouse", "{tmp}/wheels/wheelhouse"),
        (".whl/absent", "error"),
        ("/srv/wheels", "error"),
    ],
)
def test_wheelhouse_makes_pip_offline(tmp_path, wheelhouse, expected):
    """The build stage's pip.conf script, run here with /tmp/ moved under tmp_path."""
    run = next(a for s in _stages() for w, a in s["body"] if w == "RUN" and "WHEELHOUSE" in a)
    script = run[run.index("printf '[global]") : run.index("esac;") + len("esac;")]
    script = script.replace("/tmp/", f"{tmp_path}/")
    (tmp_path / "wheels" / "wheelhouse").mkdir(parents=True)
    done = _run("sh", "-euc", script, env={**os.environ, "WHEELHOUSE": wheelhouse}, timeout=30)
    if expected == "error":
        assert done.returncode != 0
        assert "WHEELHOUSE" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    conf = (tmp_path / "pip.conf").read_text()
    if expected is None:
        assert "no-index" not in conf and "find-links" not in conf
    else:
        assert "no-index = true" in conf
        assert f"find-links = {expected.format(tmp=tmp_path)}\n" in conf


def test_runtime_stage_has_no_compiler_or_git():
    """Nothing the runtime stage is built from installs a compiler or git; its base is BASE (the
    build stage's may differ); DeepSpeed's CPU shared-memory op is prebuilt in the build stage and
    checked there, so no JIT build is needed at run time; TORCH_EXTENSIONS_DIR stays set."""
    stages = _stages()
    chain = _chain(stages, stages[-1])
    assert chain[-1]["base"] == "${BASE}", chain[-1]["base"]
    for stage in chain:
        for word, args in stage["body"]:
            if word == "RUN" and re.search(r"apt-get install|apk add|dnf install|yum install", args):
                installed = set(re.split(r"[\s;&|]+", args))
                assert not installed & {*COMPILERS, "git"}, (
                    f"{stage['name']} installs {installed & {*COMPILERS, 'git'}}"
                )
    runtime_env = " ".join(a for w, a in stages[-1]["body"] if w == "ENV")
    assert "TORCH_EXTENSIONS_DIR=" in runtime_env

    build = next(s for s in stages if s["name"] == "build")
    assert build["base"] == "${BUILD_BASE}"
    ds = [
        c for w, a in build["body"] if w == "RUN" for c in _pip_calls(a) if c.rstrip().endswith("deepspeed")
    ]
    assert ds, "no pip install of deepspeed in the build stage"
    assert "--no-build-isolation" in ds[0] and "--no-binary deepspeed" in ds[0] and "--no-cache-dir" in ds[0]
    script = " ".join(a for w, a in build["body"] if w == "RUN")
    assert (
        "DS_BUILD_SHM_COMM=1" in script and 'installed_ops as ops; assert ops["deepspeed_shm_comm"]' in script
    )
    # the runtime stage proves it has no compiler when the image is built
    assert any("command -v" in a and "g++" in a for w, a in stages[-1]["body"] if w == "RUN")
    # the commit comes from a build arg (no .git in the build context, no git in the image)
    assert "ARG GIT_SHA=unknown" in DOCKERFILE.read_text()
    assert "org.opencontainers.image.revision=$GIT_SHA" in DOCKERFILE.read_text()


def test_offline_runtime_base_has_no_compiler():
    make_base = (TOOLS / "make_base.sh").read_text()
    packages = re.search(r"^PACKAGES=(\S+)$", make_base, re.M).group(1).split(",")
    assert "python3.11" in packages and "python3-venv" in packages
    assert not set(packages) & {*COMPILERS, "git"}, packages
    build_packages = re.search(r'^BUILD_PACKAGES="([^"]+)"', make_base, re.M).group(1).split()
    assert {"g++", "python3-dev"} <= set(build_packages), build_packages


def test_init_is_pid1():
    """The final stage runs everything under dumb-init (exec form), installed pinned in the build
    stage; the default command is still the server."""
    body = _runtime()["body"]
    entrypoints = [json.loads(a) for w, a in body if w == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT: the command would run as PID 1 (no signal forwarding, no reaping)"
    entry = entrypoints[-1]
    assert Path(entry[0]).name in ("dumb-init", "tini"), entry
    assert entry[1:] == ["--"], entry
    build = next(s for s in _stages() if s["name"] == "build")
    assert any(re.search(r'"dumb-init==[\d.]+(post\d+)?"', a) for w, a in build["body"] if w == "RUN")
    cmd = [json.loads(a) for w, a in body if w == "CMD"][-1]
    assert cmd[:3] == ["python", "-m", "serving"], cmd


def test_git_sha_in_the_image_comes_from_the_build(tmp_path, monkeypatch):
    """No git and no .git in the image: the commit is the GIT_SHA build argument's LUMINA_GIT_SHA."""
    from components.tracking import git_sha

    monkeypatch.delenv("LUMINA_GIT_SHA", raising=False)
    assert git_sha(tmp_path) == "unknown"
    monkeypatch.setenv("LUMINA_GIT_SHA", "0123abcd")
    assert git_sha(tmp_path) == "0123abcd"
    assert git_sha(ROOT) not in ("0123abcd", "unknown")  # a checkout's own commit comes first
