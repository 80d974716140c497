# Set-up and everyday commands. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv chromium test test-fast demo demo-stop data-relations serve bench-gpu clean

# re-run when pyproject.toml changes, so an existing environment gets new dependencies
$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test]"
	touch $(BIN)/activate

venv: $(BIN)/activate

# Debian's Chromium for the web page's browser test (tests/test_serve.py)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: could not install chromium; the browser test will fail and say so" >&2

# two test processes (pytest-xdist), a test file to each in turn, the longest first (tests/conftest.py: FIRST)
PYTEST := RAY_AUTH_MODE=token $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test: venv chromium
	$(PYTEST)

# the tests that start no Ray
test-fast: venv
	$(PYTEST) -m "not ray"

# demo data + shards, a local two-node Ray cluster with MLflow, `ray job submit` training, samples
demo: venv
	cluster/demo.sh

demo-stop:
	cluster/local.sh stop

# the harder demo set for configs/relations.yaml: two objects and the spatial relation between them,
# 64 px images (16x16 latents)
data-relations: venv
	RAY_AUTH_MODE=token $(BIN)/python -m dataprep demo --scene relations --resolution 64 --samples 8000 \
		--samples-per-shard 500 --out data/relations

# the sampling service (web page and API on http://127.0.0.1:8000/) for MODEL, by default the newest
# `make demo` model; MODEL may also be an MLflow URI (runs:/<run id>/model)
MODEL ?= $(lastword $(sort $(wildcard runs/demo-*/model)))
serve: venv
	@test -n "$(MODEL)" || { echo "make serve: no model; run make demo first or give MODEL=<folder or runs:/<id>/model>" >&2; exit 2; }
	RAY_AUTH_MODE=token $(BIN)/serve run jobs.serve:app model=$(MODEL)

# one CUDA GPU, under 8 minutes: coco256 bf16 MFU and sampling (eager, compiled), Ray Train GPU resume
bench-gpu: venv
	RAY_AUTH_MODE=token $(BIN)/python jobs/benchmark.py gpu

clean:
	rm -rf $(VENV) data runs mlruns
