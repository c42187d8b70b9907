# r1kit developer entry points.
#
#   make venv    create .venv and install r1kit (runtime deps only)
#   make dev     venv + test/lint tools ('.[dev]')
#   make run     the main job: python -m r1kit demo
#   make test    pytest on 2 workers + ruff (PYTEST_ARGS="-k foo -x" replaces the default "-n 2 --dist worksteal");
#                also installs Debian's chromium for the chat page test (scripts/install_browser.sh) and
#                bubblewrap for the code sandbox (scripts/install_sandbox.sh) and wordnet-base for EDA's
#                synonyms (scripts/install_wordnet.sh)
#   make bench   decode benchmark
#   make lint    ruff only
#   make clean   remove build/test caches (keeps .venv; 'make distclean' removes it too)

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
PIP := $(PYTHON) -m pip
# Pinned so pip takes the local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
# two pytest workers (pytest-xdist): the suite is half subprocesses and servers, so it nearly halves on 2 cores
PYTEST_ARGS ?= -n 2 --dist worksteal
# Only lint the directories that exist (benchmarks/ may be absent in a fresh checkout).
LINT_PATHS := $(wildcard r1kit tests benchmarks scripts)

.DEFAULT_GOAL := venv
.PHONY: venv dev run test lint bench clean distclean

venv: $(VENV)/.stamp-run

dev: $(VENV)/.stamp-dev

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(PYTHON)
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e .
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-run pyproject.toml
	$(PIP) install -e '.[dev]'
	@touch $@

run: venv
	$(PYTHON) -m r1kit demo

test: dev
	sh scripts/install_browser.sh
	sh scripts/install_sandbox.sh
	sh scripts/install_wordnet.sh
	sh scripts/install_espeak.sh
	$(PYTHON) -m pytest $(PYTEST_ARGS)
	$(BIN)/ruff check $(LINT_PATHS)

lint: dev
	$(BIN)/ruff check $(LINT_PATHS)

bench: dev
	$(PYTHON) benchmarks/bench_decode.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
