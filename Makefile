# The two commands in the README. Both set up .venv from the pinned requirements first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

## Set up and serve PapCAD with the bundled model on SQLite at http://127.0.0.1:8000
run: $(STAMP)
	$(VENV)/bin/papcad serve --host 127.0.0.1 --port 8000

## Set up and run every test (installs Debian chromium and PostgreSQL if missing)
test: $(STAMP)
	scripts/test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
