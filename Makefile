# lumina-pipeline: every target does its own set-up through the .venv stamp.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed builds native ops once; keep them at a fixed project path so every run reuses them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1
# pip installs without byte-compiling (--no-compile: a fresh set-up takes ~45 s instead of ~105 s on
# 2 cores); Python compiles a module on its first import and keeps the bytecode, so every target
# must be allowed to write it (a PYTHONDONTWRITEBYTECODE in the caller's environment would make
# each of the pipeline's task processes compile torch and the rest again).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test test-fast lint format bench sample-data pipeline-run pipeline-compile image test-image serve clean help

help:
	@echo "make pipeline-run   run the main job on the embedded default (tiny profile)"
	@echo "make test           run the test suite (sets itself up)"
	@echo "make bench          run the benchmarks in bench/ (JSON under bench/results/)"
	@echo "make sample-data    build data/raw (synthetic scenes, wheel-bundled photos; Debian images when apt works)"
	@echo "                    and train the tiny VAE on the scenes into data/vae/tiny (reused while they are unchanged)"
	@echo "make pipeline-compile  compile pipelines/lumina_pipeline.yaml for the Kubeflow UI"
	@echo "make serve          serve the registered champion over HTTP (after pipeline-run)"
	@echo "make image          build the container image (Dockerfile; tools/image/build.sh from nothing)"
	@echo "make lint           ruff"

# GPU=1 TORCH_INDEX_URL=<CUDA wheel index>: install a CUDA build of the same torch release first
# and constrain everything else as usual (the CPU pin is dropped from the constraints).
GPU ?= 0
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
ifeq ($(GPU),1)
	@test -n "$(TORCH_INDEX_URL)" || { echo "error: GPU=1 needs TORCH_INDEX_URL (a CUDA wheel index for torch 2.13.0)"; exit 2; }
	$(BIN)/python -m pip install --quiet --no-compile "torch==2.13.0" --index-url "$(TORCH_INDEX_URL)"
	grep -v '^torch==' constraints.txt > $(VENV)/constraints-gpu.txt
	$(BIN)/python -m pip install --quiet --no-compile -c $(VENV)/constraints-gpu.txt -e ".[dev]"
else
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev]"
endif
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: sample-data
	mkdir -p bench/results
	$(BIN)/python -m bench.sampler --out bench/results/sampler.json
	$(BIN)/python -m bench.train --out bench/results/train.json
	$(BIN)/python -m bench.ingest --out bench/results/ingest.json
	$(BIN)/python -m bench.recaption --out bench/results/recaption.json
	$(BIN)/python -m bench.serve --out bench/results/serve.json
	$(BIN)/python -m bench.text_features --out bench/results/text_features.json
	$(BIN)/python -m bench.scale --out bench/results/scale.json
	$(BIN)/python -m bench.loader --out bench/results/loader.json
	$(BIN)/python -m bench.learning --out bench/results/learning.json

sample-data: $(STAMP)
	$(BIN)/python -m data_tools sample-data --out data/raw

# The main job: the Kubeflow pipeline on kfp's local runner (ingest -> recaption -> tier -> three
# DeepSpeed stages -> evaluate -> MLflow registration), data/ versioned by DVC on a loopback S3
# server, MLflow on sqlite under outputs/. MLFLOW_SERVER=1 starts a real mlflow server instead.
PIPELINE_OUT ?= outputs
MLFLOW_SERVER ?= 0
pipeline-run: sample-data
	$(BIN)/python -m pipelines run --out $(PIPELINE_OUT) --dvc-data data \
		$(if $(filter 1,$(MLFLOW_SERVER)),--mlflow-server,)

# Compile the cluster pipeline for the Kubeflow UI (committed; a test checks it for drift).
pipeline-compile: $(STAMP)
	$(BIN)/python -m pipelines compile --out pipelines/lumina_pipeline.yaml

# Serve the registered champion of the last pipeline-run on http://127.0.0.1:8080 (docs at /docs).
SERVE_MODEL ?= models:/lumina-tiny@champion
SERVE_PORT ?= 8080
serve: $(STAMP)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath $(PIPELINE_OUT))/mlflow.db} \
	$(BIN)/python -m serving --model $(SERVE_MODEL) --model-dir $(PIPELINE_OUT)/serve-cache \
		--defaults-file serving/profiles/tiny.yaml --port $(SERVE_PORT)

# The container image for the components and the server. BASE=<image> builds from a base made
# offline (nothing can be pulled here); a local CPU torch wheel is used when one is on disk.
IMAGE ?= lumina-pipeline:0.1.0
CONTAINER_ENGINE ?= docker
TORCH_WHEEL_DIR ?= /opt/wheels
# Private index / offline wheelhouse (see the Dockerfile header), passed on when set:
#   make image PIP_INDEX_URL=https://mirror/simple    make image WHEELHOUSE=.whl/wheelhouse
IMAGE_PIP_ARGS := WHEELHOUSE PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST
# BASE / BUILD_BASE: runtime and build-stage bases (tools/image/make_base.sh makes both offline).
# Extra CA certificates (e.g. a TLS-inspecting proxy) trusted by pip during the build only.
BUILD_CA ?= $(wildcard /usr/local/share/ca-certificates/*.crt)
image:
	mkdir -p .whl && rm -rf .whl/ca
	$(if $(strip $(BUILD_CA)),mkdir -p .whl/ca && cp $(BUILD_CA) .whl/ca/,)
	@wheel=$$(ls $(TORCH_WHEEL_DIR)/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1); \
	if [ -n "$$wheel" ]; then cp "$$wheel" .whl/; extra="--build-arg TORCH_WHEEL=$$(basename $$wheel)"; fi; \
	sha=$$(git rev-parse HEAD 2>/dev/null || echo unknown); \
	set -x; $(CONTAINER_ENGINE) build $(if $(BASE),--build-arg BASE=$(BASE),) \
		$(if $(BUILD_BASE),--build-arg BUILD_BASE=$(BUILD_BASE),) $$extra --build-arg GIT_SHA=$$sha \
		$(foreach v,$(IMAGE_PIP_ARGS),$(if $($(v)),--build-arg '$(v)=$($(v))',)) -t $(IMAGE) .

# Build the image (starting a local engine / an offline base where needed) and test it.
test-image: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_image.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
