# popcontrol — two commands do the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DAYS ?= 3
DEMO_ARGS ?=

.PHONY: demo test venv dev-venv system-deps lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools >/dev/null
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -e '.[dev,present]'
	touch $@

venv: $(VENV)/.installed

dev-venv: $(VENV)/.installed-dev

## System packages the tests need (Xvfb for PsychoPy windows, Chromium for the dashboard).
system-deps:
	bash scripts/system-deps.sh

demo: venv
	$(VENV)/bin/popcontrol demo --days $(DAYS) $(DEMO_ARGS)

test: dev-venv system-deps
	$(VENV)/bin/ruff check server rig models tests bench
	$(VENV)/bin/mypy
	bash scripts/run-tests.sh

lint: dev-venv
	$(VENV)/bin/ruff check server rig models tests bench
	$(VENV)/bin/mypy

bench: venv
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) var test-output .pytest_cache .mypy_cache
