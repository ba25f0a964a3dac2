# One image for the pipeline components (KFP base_image) and the sampler server.
#   CPU (default):  docker build -t lumina-pipeline:0.1.0 .
#   GPU:            docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                       -t lumina-pipeline:0.1.0-cuda .
# The CUDA runtime comes inside the CUDA torch wheels, so both variants share the slim Python base.
# Where nothing can be pulled, pass BASE=<an image made offline> (see `make image`).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    HOME=/home/lumina

# g++ for DeepSpeed's JIT-built ops; git for the git sha recorded with each run.
RUN apt-get update && apt-get install -y --no-install-recommends g++ git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/lumina --shell /usr/sbin/nologin lumina \
    && mkdir -p /cache /models && chown 10001:10001 /cache /models

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY .whl/ /tmp/wheels/
RUN if [ -n "$TORCH_WHEEL" ]; then python -m pip install "/tmp/wheels/$TORCH_WHEEL"; \
    else python -m pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"; fi \
    && grep -v '^torch==' constraints.txt > /tmp/constraints.txt
COPY model ./model
COPY components ./components
COPY pipelines ./pipelines
COPY data_tools ./data_tools
COPY services ./services
COPY serving ./serving
COPY bench ./bench
COPY benchmarks ./benchmarks
RUN python -m pip install -c /tmp/constraints.txt -e . && rm -rf /tmp/wheels

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
CMD ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8080"]
