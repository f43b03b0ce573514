# The two entry points of the README: `make run` and `make test`.
# TORCH_SPEC chooses the torch build. The default is the CPU wheel this project is
# developed on; GPU users pass their own, for example
#   make run TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,test,hf,experiments
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Tests that CI runs: everything fast, plus the representative slow ones.
TEST_MARKERS ?= not slow or representative

.PHONY: setup run test test-slow test-all lint format bench bench-cuda clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, so that nothing below can pull in another build.
	$(PIP) install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $@

run: setup
	$(PY) -m tram.experiments.main_job

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -m "$(TEST_MARKERS)"

# The periodic job: the slow tests CI leaves out (real SmolLM2 GGUF->Llama conversion and its
# language-modelling run, the other real-asset runs; 40 to 110 s each on 2 CPU cores), and the
# rest of the test matrices whose representative few `make test` runs.
test-slow: setup
	$(VENV)/bin/pytest -m "slow and not representative"

test-all: lint
	$(VENV)/bin/pytest

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(VENV)/bin/pytest benchmarks --benchmark-only -p no:cacheprovider

# The step-cost benchmark on one CUDA GPU in under ten minutes; installs nothing (the GPU machine
# may have no network). BENCH_CUDA_ARGS=--dry-run prints the plan. See benchmarks/README.md.
bench-cuda:
	bash benchmarks/cuda.sh $(BENCH_CUDA_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
