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

.PHONY: setup test test-fast lint format bench pipeline-run clean help

help:
	@echo "make pipeline-run   run the whole pipeline on the embedded default (tiny profile)"
	@echo "make test           run the test suite (sets itself up)"
	@echo "make bench          run the benchmarks in bench/ (JSON under bench/results/)"
	@echo "make lint           ruff"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
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
	$(BIN)/python -m bench.sampler --out bench/results/sampler.json

pipeline-run: $(STAMP)
	$(BIN)/python -m model.cli smoke

clean:
	rm -rf $(VENV) .cache build *.egg-info
