# The README's two set-up commands: `make demo` (main job) and `make test` (lint + tests).
# Both create the virtualenv on first use, so they work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed before the package: an unpinned torch would pull a multi-GB CUDA build on a CPU box.
# GPU users: `make demo TORCH=torch` (or any torch>=2.5 build for your CUDA).
TORCH ?= torch==2.13.0
SHARED ?= ../shared/data
TOKENIZER ?= $(SHARED)/tokenizers/gpt-neox-20b/tokenizer.json
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[hf]"
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/longboi init tiny runs/demo --tokenizer $(TOKENIZER)
	$(BIN)/longboi info runs/demo
	$(BIN)/longboi generate runs/demo --prompt "ROMEO:" --max-new-tokens 40 --seed 0

test: $(VENV)/.dev lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check longboi tests bench
	$(BIN)/ruff format --check longboi tests bench

bench: $(VENV)/.dev
	$(BIN)/python bench/model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
