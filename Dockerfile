# One image for the pipeline components (KFP base_image) and the sampler server.
#   CPU (default):  docker build -t lumina-pipeline:0.1.0 .
#   GPU:            docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                       -t lumina-pipeline:0.1.0-cuda .
# The CUDA runtime comes inside the CUDA torch wheels, so both variants share the slim Python base.
# Where nothing can be pulled, pass BASE=<an image made offline>: tools/image/make_base.sh builds
# lumina-base:bookworm (Debian bookworm + python3.11, g++, git) with debootstrap; see `make image`.
# Any Python 3.11/3.12 base works: python at /usr/local/bin (python:*-slim) or /usr/bin (Debian),
# because everything is installed into a virtual environment at /opt/venv, first on PATH.
#
# Build inputs in .whl/ (git-ignored, filled by `make image`):
#   .whl/<torch wheel>   a local CPU torch wheel, selected with --build-arg TORCH_WHEEL=<file name>
#   .whl/ca/*.crt        extra CA certificates trusted by pip during the build only (a TLS-inspecting
#                        proxy); they are not part of the final image.
ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- os: packages and the runtime user
FROM ${BASE} AS os
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8
# g++ for DeepSpeed's JIT-built ops; git for the git sha recorded with each run. A base that
# already has both (lumina-base) skips apt, so the build needs no Debian mirror.
RUN set -eu; \
    if ! command -v g++ >/dev/null 2>&1 || ! command -v git >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends g++ git \
        && rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; v = sys.version_info[:2]; assert (3, 11) <= v < (3, 13), f"need Python 3.11 or 3.12, base has {sys.version}"'; \
    python3 -c 'import ensurepip, venv' || { echo "base image lacks venv/ensurepip (python3-venv)" >&2; exit 1; }; \
    useradd --uid 10001 --create-home --home-dir /home/lumina --shell /usr/sbin/nologin lumina; \
    mkdir -p /cache /models && chown 10001:10001 /cache /models

# ---------------------------------------------------------------- build: the virtual environment
FROM os AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=""
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CONFIG_FILE=/tmp/pip.conf
COPY .whl/ /tmp/wheels/
RUN set -eu; \
    printf '[global]\n' > /tmp/pip.conf; \
    if ls /tmp/wheels/ca/*.crt >/dev/null 2>&1; then \
        cat /etc/ssl/certs/ca-certificates.crt /tmp/wheels/ca/*.crt > /tmp/ca-bundle.pem 2>/dev/null \
            || cat /tmp/wheels/ca/*.crt > /tmp/ca-bundle.pem; \
        printf 'cert = /tmp/ca-bundle.pem\n' >> /tmp/pip.conf; \
    fi; \
    python3 -m venv /opt/venv; \
    python -m pip install --quiet "pip==25.3" "setuptools==84.2.1"; \
    if [ -n "$TORCH_WHEEL" ]; then python -m pip install "/tmp/wheels/$TORCH_WHEEL"; \
    else python -m pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"; fi
# The dependencies alone (cached until pyproject.toml or constraints.txt change); the torch pin is
# dropped from the constraints so the build installed above (CPU or CUDA) is kept.
COPY pyproject.toml constraints.txt /tmp/project/
RUN set -eu; cd /tmp/project; \
    grep -v '^torch==' constraints.txt > constraints-notorch.txt; \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt; \
    python -m pip install -c constraints-notorch.txt -r requirements.txt; \
    python -c 'import torch; print("torch", torch.__version__)'

# ---------------------------------------------------------------- runtime
FROM os
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    HOME=/home/lumina

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
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
RUN python -m pip install --no-index --no-deps --no-build-isolation -e . \
    && python -m pip check \
    && rm -rf build

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
CMD ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8080"]
