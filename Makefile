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

.PHONY: setup test test-fast lint format bench sample-data pipeline-run clean help

help:
	@echo "make pipeline-run   run the main job on the embedded default (tiny profile)"
	@echo "make test           run the test suite (sets itself up)"
	@echo "make bench          run the benchmarks in bench/ (JSON under bench/results/)"
	@echo "make sample-data    build data/raw offline (synthetic compositional set)"
	@echo "make lint           ruff"

# GPU=1 TORCH_INDEX_URL=<CUDA wheel index>: install a CUDA build of the same torch release first
# and constrain everything else as usual (the CPU pin is dropped from the constraints).
GPU ?= 0
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
ifeq ($(GPU),1)
	@test -n "$(TORCH_INDEX_URL)" || { echo "error: GPU=1 needs TORCH_INDEX_URL (a CUDA wheel index for torch 2.13.0)"; exit 2; }
	$(BIN)/python -m pip install --quiet "torch==2.13.0" --index-url "$(TORCH_INDEX_URL)"
	grep -v '^torch==' constraints.txt > $(VENV)/constraints-gpu.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints-gpu.txt -e ".[dev]"
else
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
endif
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	mkdir -p bench/results
	$(BIN)/python -m bench.sampler --out bench/results/sampler.json
	$(BIN)/python -m bench.train --out bench/results/train.json
	$(BIN)/python -m bench.ingest --out bench/results/ingest.json

sample-data: $(STAMP)
	$(BIN)/python -m data_tools sample-data --out data/raw

# Until the Kubeflow pipeline lands (issue #6) the main job chains the steps that exist:
# sample data -> three training stages (DeepSpeed, MLflow) -> TeaCache calibration -> samples.
PIPELINE_OUT ?= outputs
TRAIN_OUT := $(PIPELINE_OUT)/train
pipeline-run: sample-data
	$(BIN)/python -m components.train --stage lowres --profile tiny \
		--manifest data/raw/synthetic/manifest.parquet --output-dir $(TRAIN_OUT)/lowres
	$(BIN)/python -m components.train --stage highres --profile tiny --init-from $(TRAIN_OUT)/lowres/pipeline \
		--manifest data/raw/synthetic/manifest.parquet --output-dir $(TRAIN_OUT)/highres
	$(BIN)/python -m components.train --stage hq --profile tiny --init-from $(TRAIN_OUT)/highres/pipeline \
		--manifest data/raw/synthetic/manifest.parquet --output-dir $(TRAIN_OUT)/hq
	$(BIN)/lumina calibrate-teacache --model $(TRAIN_OUT)/hq/pipeline --height 128 --width 128 --steps 20
	$(BIN)/lumina sample --model $(TRAIN_OUT)/hq/pipeline --height 128 --width 128 --steps 20 \
		--system-prompt B --out $(PIPELINE_OUT)/samples \
		--prompt "two red circles on the left and one blue square on the right" --prompt "three yellow stars"
	@echo "model: $(TRAIN_OUT)/hq/pipeline   samples: $(PIPELINE_OUT)/samples"
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(TRAIN_OUT))/mlflow.db"

clean:
	rm -rf $(VENV) .cache build *.egg-info
