# Set-up and everyday commands. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test test-fast demo clean

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

demo: venv
	RAY_AUTH_MODE=token $(BIN)/python -m dataprep demo --out data/demo --samples 4000 --vae-steps 800 --samples-per-shard 500 --val-fraction 0.1
	RAY_AUTH_MODE=token $(BIN)/python jobs/train.py --config configs/demo.yaml

clean:
	rm -rf $(VENV) data runs mlruns
