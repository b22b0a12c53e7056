# vmcluster: `make demo` runs the showcase, `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup system-packages demo test lint typecheck unit integration bench clean

setup: system-packages $(VENV)/.installed

system-packages:
	@bash scripts/setup-system.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: setup
	@PATH="$(CURDIR)/$(BIN):$$PATH" KEEP="$(KEEP)" bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

unit: setup
	$(BIN)/pytest -m "not integration"

integration: setup
	$(BIN)/pytest -m integration

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .cache
