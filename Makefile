# Every target sets itself up: a fresh machine needs only Python 3.11+ and the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup example test bench clean chromium llama-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Runs the whole workflow on examples/ with the default model.
example: $(STAMP)
	cd examples && ../$(BIN)/cached-prompts precache-preludes
	cd examples && ../$(BIN)/cached-prompts outputs-for-drafts -n 3 --max-tokens 64
	cd examples && ../$(BIN)/cached-prompts outputs-test-prompts -n 2 --max-tokens 64
	cd examples && ../$(BIN)/cached-prompts outputs-test-prompts --deterministic --max-tokens 64
	cd examples && ../$(BIN)/cached-prompts show-stats-on-tokens-number
	cd examples && ../$(BIN)/cached-prompts report

# Debian's chromium, for the report's browser tests (tests skip without it).
chromium:
	scripts/install-chromium.sh

# llama.cpp's llama-server, built once per machine into ~/.cache/cached-prompts (tests of the
# server backend skip without it).
llama-server:
	scripts/build-llama-server.sh

test: $(STAMP) chromium llama-server
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) examples/llm_cache examples/prelude_drafts_outputs examples/test_prompts_outputs examples/report.html
