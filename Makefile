# normlab: `make demo` runs the main job, `make test` runs lint and the test-suite.
# Both create .venv and install everything on a fresh machine.
#
# torch is installed first, pinned, because a loose spec pulls a multi-GB CUDA build:
#   make test                                  # CPU build (torch==2.13.0)
#   make test TORCH_SPEC=torch TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?= -n 2

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.normlab-installed

.PHONY: install test lint format demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,plot]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

format: install
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

demo: install
	$(VENV)/bin/normlab list
	$(VENV)/bin/normlab smoke

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
