# fm-suite developer commands. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds our machines serve from local disk (see README)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-slow lint bench-cpu

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[dev]"

demo: install
	$(BIN)/fm-demo

test: install
	$(BIN)/python -m pytest -q -x --timeout=900 tests

test-slow: install
	$(BIN)/python -m pytest -q -m slow --timeout=3600 tests

lint:
	$(BIN)/ruff check fm pathology earthobs evaluation tests bench

bench-cpu:
	$(BIN)/python bench/ssl_step.py --device cpu
