# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo lint test test-fast bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) run_experiment.py --demo

# What CI runs (.ci/run): the lint, then every layer (tests/unit and tests/e2e).
test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

# The quick loop while editing: the unit layer without the tests marked slow (tests/README.md).
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit -m "not slow"

clean:
	rm -rf logs trained_models plots .cache demo_data bench/results
