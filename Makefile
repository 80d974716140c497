# Set-up and everyday commands. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test test-fast demo demo-stop clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test]"

venv: $(BIN)/activate

test: venv
	RAY_AUTH_MODE=token $(BIN)/python -m pytest -q

test-fast: venv
	RAY_AUTH_MODE=token $(BIN)/python -m pytest -q -m "not ray"

# demo data + shards, a local two-node Ray cluster with MLflow, `ray job submit` training, samples
demo: venv
	cluster/demo.sh

demo-stop:
	cluster/local.sh stop

clean:
	rm -rf $(VENV) data runs mlruns
