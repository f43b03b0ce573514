# The two entry points of the README: `make run` and `make test`.
# TORCH_SPEC chooses the torch build. The default is the CPU wheel this project is
# developed on; GPU users pass their own, for example
#   make run TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,test,hf,experiments
# A pip constraints file for both installs (test-oldest passes .ci/oldest.txt).
CONSTRAINTS ?=
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Tests that CI runs: everything fast, plus the representative slow ones.
TEST_MARKERS ?= not slow or representative

.PHONY: setup run test test-slow test-oldest test-all lint format bench bench-cuda clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, so that nothing below can pull in another build.
	$(PIP) install --quiet $(TORCH_INDEX) $(CONSTRAINT_FLAG) "$(TORCH_SPEC)"
	$(PIP) install --quiet $(CONSTRAINT_FLAG) -e ".[$(EXTRAS)]"
	touch $@

run: setup
	$(PY) -m tram.experiments.main_job

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	# The other Pythons setup.cfg declares, checked statically (syntax and standard library):
	# no interpreter for them is at hand to run the suite.
	$(VENV)/bin/mypy --python-version 3.10
	$(VENV)/bin/mypy --python-version 3.12

test: lint
	$(VENV)/bin/pytest -m "$(TEST_MARKERS)"

# The periodic job: the slow tests CI leaves out (real SmolLM2 GGUF->Llama conversion and its
# language-modelling run, the other real-asset runs; 40 to 110 s each on 2 CPU cores), and the
# rest of the test matrices whose representative few `make test` runs.
test-slow: setup
	$(VENV)/bin/pytest -m "slow and not representative"

# The periodic job's other half: the same tests on the oldest torch and client libraries that
# setup.cfg allows (.ci/oldest.txt), in .venv-oldest. torch comes from PyPI, a CUDA build that
# also runs on the CPU (about 4 GB with its CUDA libraries).
test-oldest:
	$(MAKE) test VENV=.venv-oldest TORCH_SPEC=torch CONSTRAINTS=.ci/oldest.txt

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
	rm -rf $(VENV) .venv-oldest .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
