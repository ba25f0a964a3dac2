# One image for the pipeline components (KFP base_image) and the sampler server.
#   CPU (default):  docker build -t lumina-pipeline:0.1.0 .
#   GPU:            docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                       -t lumina-pipeline:0.1.0-cuda .
# A plain `docker build .` (or `buildah bud .`) works from a clean clone: the optional inputs in
# .whl/ are all optional (the folder itself is committed with only its README.md).
# The CUDA runtime comes inside the CUDA torch wheels, so both variants share the slim Python base.
#
# Bases. BASE is the runtime base, BUILD_BASE (default: BASE) the one the virtual environment is
# built on; both must put python3 at the same path (same distribution and Python). The build stage
# installs g++ / python3-dev with apt when BUILD_BASE lacks them; the runtime stage has no compiler.
# Where nothing can be pulled, tools/image/make_base.sh builds both offline with debootstrap:
#   lumina-base:bookworm (Debian bookworm + python3.11, no compiler, no git) and
#   lumina-base:bookworm-build (the same + g++, python3-dev); see `make image` / tools/image/build.sh.
# Any Python 3.11/3.12 base works: python at /usr/local/bin (python:*-slim) or /usr/bin (Debian),
# because everything is installed into a virtual environment at /opt/venv, first on PATH.
#
# Build arguments for private and offline builds (build stage only, never in the final image):
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
#                        a private index / mirror; pip reads them from the environment in every pip
#                        call of the build. torch comes from TORCH_INDEX_URL (point that at the
#                        mirror's torch index too), unless TORCH_WHEEL or WHEELHOUSE is given.
#   WHEELHOUSE=.whl      (or a folder inside .whl/, e.g. .whl/wheelhouse) fully offline:
#                        every pip call runs with --no-index --find-links <that folder>, which must
#                        hold every wheel (pip, setuptools, torch, dumb-init, all of constraints.txt)
#                        and the deepspeed sdist (deepspeed-0.19.8.tar.gz; it is always built from
#                        source here, see below). Fill it with `pip download` on a connected machine.
#   TORCH_WHEEL=<file>   a local torch wheel in .whl/ (`make image` copies the CPU one there).
#   GIT_SHA=<commit>     the code's commit: image label org.opencontainers.image.revision and
#                        LUMINA_GIT_SHA in the environment (`make image` passes `git rev-parse HEAD`).
# Other build inputs in .whl/ (git-ignored except its README.md, filled by `make image`):
#   .whl/ca/*.crt        extra CA certificates trusted by pip during the build only (a TLS-inspecting
#                        proxy); they are not part of the final image.
#
# DeepSpeed's native ops: the trainer hands deepspeed.initialize a plain torch AdamW, so no fused /
# CPU optimizer op is used; the one op a run needs is the CPU accelerator's shared-memory collective
# (deepspeed_shm_comm, built by every TorchBackend on CPU; the CUDA accelerator has no such op). It
# is prebuilt into the venv at install time (DS_BUILD_SHM_COMM=1, DS_BUILD_OPS=0, from the sdist,
# --no-build-isolation so torch is seen) and the build fails if it is not, so nothing is
# JIT-compiled at run time and the runtime image carries no compiler. TORCH_EXTENSIONS_DIR stays
# set (writable /cache) for any op a future config might JIT-build on a base that has a compiler.
#
# PID 1 is dumb-init (the PyPI wheel, binary in /opt/venv/bin): it forwards signals and reaps zombies.
# It runs when the container's command is given as CMD / Kubernetes `args:`; a Kubernetes `command:`
# replaces the ENTRYPOINT.
ARG BASE=python:3.11-slim-bookworm
ARG BUILD_BASE=${BASE}

# ---------------------------------------------------------------- os: the runtime base and user
FROM ${BASE} AS os
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8
RUN set -eu; \
    python3 -c 'import sys; v = sys.version_info[:2]; assert (3, 11) <= v < (3, 13), f"need Python 3.11 or 3.12, base has {sys.version}"'; \
    useradd --uid 10001 --create-home --home-dir /home/lumina --shell /usr/sbin/nologin lumina; \
    mkdir -p /cache /models && chown 10001:10001 /cache /models

# ---------------------------------------------------------------- build: the virtual environment
FROM ${BUILD_BASE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=""
ARG WHEELHOUSE=""
# No defaults: unset unless given, so pip's own defaults apply.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 \
    PIP_CONFIG_FILE=/tmp/pip.conf
# g++ and the Python headers for DeepSpeed's prebuilt op (this stage only; python:*-slim has the
# headers, Debian's python3 needs python3-dev). A base that has both (lumina-base:bookworm-build)
# skips apt, so the build needs no Debian mirror.
RUN set -eu; \
    missing=""; \
    command -v g++ >/dev/null 2>&1 || missing="g++"; \
    python3 -c 'import os, sysconfig; assert os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
        2>/dev/null || missing="$missing python3-dev"; \
    if [ -n "$missing" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $missing \
        && rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; v = sys.version_info[:2]; assert (3, 11) <= v < (3, 13), f"need Python 3.11 or 3.12, base has {sys.version}"'; \
    python3 -c 'import ensurepip, venv' || { echo "base image lacks venv/ensurepip (python3-venv)" >&2; exit 1; }
COPY .whl/ /tmp/wheels/
RUN set -eu; \
    printf '[global]\n' > /tmp/pip.conf; \
    case "$WHEELHOUSE" in \
        "") ;; \
        .whl|.whl/|./.whl|./.whl/) printf 'no-index = true\nfind-links = /tmp/wheels\n' >> /tmp/pip.conf ;; \
        .whl/*|./.whl/*) dir="/tmp/wheels/${WHEELHOUSE#*.whl/}"; test -d "$dir" \
            || { echo "WHEELHOUSE=$WHEELHOUSE: no such folder in the build context" >&2; exit 1; }; \
            printf 'no-index = true\nfind-links = %s\n' "$dir" >> /tmp/pip.conf ;; \
        *) echo "WHEELHOUSE must be .whl or a folder inside .whl/ (got $WHEELHOUSE)" >&2; exit 1 ;; \
    esac; \
    if ls /tmp/wheels/ca/*.crt >/dev/null 2>&1; then \
        cat /etc/ssl/certs/ca-certificates.crt /tmp/wheels/ca/*.crt > /tmp/ca-bundle.pem 2>/dev/null \
            || cat /tmp/wheels/ca/*.crt > /tmp/ca-bundle.pem; \
        printf 'cert = /tmp/ca-bundle.pem\n' >> /tmp/pip.conf; \
    fi; \
    python3 -m venv /opt/venv; \
    python -m pip install --quiet "pip==25.3" "setuptools==84.2.1" "dumb-init==1.2.5.post1"; \
    if [ -n "$TORCH_WHEEL" ]; then python -m pip install "/tmp/wheels/$TORCH_WHEEL"; \
    else python -m pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"; fi; \
    dumb-init --version
# The dependencies alone (cached until pyproject.toml or constraints.txt change); the torch pin is
# dropped from the constraints so the build installed above (CPU or CUDA) is kept. DeepSpeed first,
# from its sdist with the CPU shared-memory op prebuilt (see the header); checked, not assumed.
COPY pyproject.toml constraints.txt /tmp/project/
RUN set -eu; cd /tmp/project; \
    grep -v '^torch==' constraints.txt > constraints-notorch.txt; \
    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
        python -m pip install --no-cache-dir --no-build-isolation --no-binary deepspeed \
            -c constraints-notorch.txt deepspeed; \
    python -c 'from deepspeed.git_version_info import installed_ops as ops; assert ops["deepspeed_shm_comm"], ops'; \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt; \
    python -m pip install -c constraints-notorch.txt -r requirements.txt; \
    python -c 'import torch; print("torch", torch.__version__)'

# ---------------------------------------------------------------- runtime (no compiler, no git)
FROM os
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    GIT_PYTHON_REFRESH=quiet \
    HOME=/home/lumina

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
# Every package of pyproject.toml's [tool.setuptools.packages.find] include, plus the data that
# runtime code reads from the checkout (benchmarks/: components/evaluate/suites.py); the image test
# (tests/test_image.py) compares this list with pyproject.toml.
COPY common ./common
COPY storage ./storage
COPY model ./model
COPY components ./components
COPY pipelines ./pipelines
COPY data_tools ./data_tools
COPY services ./services
COPY serving ./serving
COPY bench ./bench
COPY benchmarks ./benchmarks
# The project itself, offline: every dependency is already in /opt/venv (pip check proves it).
RUN set -eu; \
    python -m pip install --no-index --no-deps --no-build-isolation -e .; \
    python -m pip check; \
    rm -rf build; \
    for c in g++ gcc cc c++; do \
        if command -v "$c" >/dev/null 2>&1; then echo "a compiler ($c) in the runtime image" >&2; exit 1; fi; \
    done

# The code's commit (no .git in the image: `git rev-parse` cannot work here).
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.revision=$GIT_SHA
ENV LUMINA_GIT_SHA=$GIT_SHA

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
ENTRYPOINT ["/opt/venv/bin/dumb-init", "--"]
CMD ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8080"]
