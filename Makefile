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

.PHONY: demo test lint bench browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[hf]"
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The main job: a byte-level BPE tokenizer and a small MPT trained on Tiny Shakespeare (the first 90%;
# the last 10% is held out) for 6 minutes of wall clock in the precision the CPU computes natively
# (precision: auto), then a sample. Under 10 minutes in all on 2 cores, AVX2 or AVX-512 alike.
DEMO := runs/demo
SHAKESPEARE := $(SHARED)/text/tinyshakespeare.txt
demo: $(VENV)/.installed
	$(BIN)/longboi train-tokenizer $(SHAKESPEARE) --vocab-size 4096 --holdout-fraction 0.1 --out $(DEMO)/tokenizer.json
	$(BIN)/longboi prepare $(SHAKESPEARE) --out $(DEMO)/data --tokenizer $(DEMO)/tokenizer.json --seq-len 257 \
		--val-fraction 0.1
	$(BIN)/longboi train configs/pretrain/tiny-shakespeare.yaml
	$(BIN)/longboi generate $(DEMO)/train/final --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 \
		--top-k 50 --seed 0

test: $(VENV)/.dev lint browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The chat page's test drives Debian's headless chromium: installed here when running as root (CI);
# elsewhere, or if apt cannot reach its mirror, that one test skips and says why.
browser:
	@if [ "$$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
		>/dev/null) || echo "could not install chromium: the browser test will skip"; fi

lint: $(VENV)/.dev
	$(BIN)/ruff check longboi tests bench
	$(BIN)/ruff format --check longboi tests bench

bench: $(VENV)/.dev
	$(BIN)/python bench/model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
