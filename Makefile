# Two entry points do all set-up on a fresh machine:
#   make serve   install into .venv, then serve the default model (python -m engine.launch)
#   make test    install with the dev extras, then lint, type-check and run the tests
# GPU hosts: TORCH_SPEC="torch==2.11.0" (or the CUDA build you run) make serve

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint install install-dev clean

serve: install
	$(BIN)/python -m engine.launch $(ARGS)

test: install-dev lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# torch goes first and pinned: an unpinned torch would pull the newest CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
