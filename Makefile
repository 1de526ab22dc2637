# The two commands in the README. Both set up .venv from the lock file first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The lock files are resolved for the platform of the image and of CI: Linux x86_64, CPython 3.11.
LOCK := $(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

.PHONY: run test lint lock

# Every package at the version and hash of the lock file, then PapCAD itself (editable) without dependencies.
$(STAMP): requirements-dev.txt pyproject.toml
	@echo "Setting up $(VENV) from requirements-dev.txt: about 2 GB (TensorFlow is most of it);"
	@echo "a first install takes 5 to 10 minutes, a later one only fetches what changed."
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --require-hashes -r requirements-dev.txt
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

## Set up and serve PapCAD with the bundled model on SQLite at http://127.0.0.1:8000
run: $(STAMP)
	$(VENV)/bin/papcad serve --host 127.0.0.1 --port 8000

## Set up and run every test (installs Debian chromium and PostgreSQL if missing)
test: $(STAMP)
	scripts/test.sh

## Quick check while working: no lint, SQLite only, no slow/browser tests (marks in pyproject.toml)
.PHONY: test-fast
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow and not browser and not postgres"

## Style, format and types (mypy: settings in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

## Re-resolve the lock files after a change to the dependencies in pyproject.toml (UPGRADE=1: newest allowed versions).
## requirements.txt (running, the Dockerfile) starts from requirements-dev.txt's versions so the two agree.
lock: $(STAMP)
	$(LOCK) --extra dev $(if $(UPGRADE),--upgrade) -o requirements-dev.txt >/dev/null
	cp requirements-dev.txt requirements.txt
	$(LOCK) -o requirements.txt >/dev/null
