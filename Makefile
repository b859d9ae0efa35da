# Entry points (see README): `make serve` runs the main job, `make demo` scores offline, `make test` checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

# torch==2.13.0 first: an unpinned torch would pull the newest CUDA build (several GB).
$(BIN)/polyreward: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install serve demo train test
install: $(BIN)/polyreward

# The main job: serve the shipped default model (exported once into ~/.cache/polyreward) on 127.0.0.1:8000.
serve: $(BIN)/polyreward
	$(BIN)/polyreward serve

demo: $(BIN)/polyreward
	$(BIN)/polyreward export --default --out build/demo/artifact --overwrite
	$(BIN)/polyreward score build/demo/artifact --input examples/items.jsonl

# Retrain the default model from ../shared/data (or $$POLYREWARD_DATA): about 20 minutes on 2 CPU cores.
train: $(BIN)/polyreward
	$(BIN)/polyreward train --config configs/default.yaml

test: $(BIN)/polyreward
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q
