# The README's commands. Each target creates the virtual environment first if it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.longtrain-installed
# CPU build of torch from the local wheel store; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.7.1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export WANDB_SILENT ?= true

.PHONY: all setup demo test lint format bench gpu-check clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,hf,slurm]' $(TRITON_PIN)
	# DeepSpeed's build imports torch, so it needs the venv's torch (no isolation) and no op builds.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.16'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports  # the layers of docs/ARCHITECTURE.md (contracts in pyproject.toml)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -m "not gpu and not slow" -q

bench: $(STAMP)
	$(PY) -m bench.run_all

# One GPU machine end to end in under 8 minutes (bench/gpu_check/; without a GPU it says so and
# exits 0). No venv is built for it: a GPU machine brings its own CUDA torch, so it runs with
# .venv's python when there is one, else python3 (`make gpu-check GPU_PY=...` to choose).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf outputs runs multirun data_cache .pytest_cache .ruff_cache
