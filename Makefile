# Two set-up commands: `make demo` and `make test`. Both create .venv if missing and install the project.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision must be a matched pair (timm imports torchvision).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PAIR)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check featcache adapters study cli tests benchmarks scripts
	$(BIN)/mypy

demo: $(STAMP)
	HF_HUB_OFFLINE=1 bash scripts/demo.sh $(BIN)

clean:
	rm -rf demo_out .pytest_cache
