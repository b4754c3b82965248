# pipeline — every stage is a target; `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help setup test lint

help: ## List targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -e '.[dev]'
	touch $@

setup: $(STAMP) ## Create .venv and install the project (editable) with dev tools

test: setup ## Run the test suite, then the linter
	$(BIN)/python -m pytest
	$(BIN)/ruff check pipeline scripts tests

lint: setup ## ruff
	$(BIN)/ruff check pipeline scripts tests
