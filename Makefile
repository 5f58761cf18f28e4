# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
IAT_DATA_DIR ?= $(abspath ../shared/data)
export IAT_DATA_DIR

.PHONY: demo test test-fast venv proto lock clean bench

venv: $(STAMP)

# Installs the pinned set (constraints.txt); torch==2.13.0 comes from the local CPU wheel.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/iat demo

# The full suite, slow end-to-end tests included (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q -rs

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Regenerate the gRPC stubs from proto/ (tests fail when they are stale).
proto: $(STAMP)
	$(PY) -m services.protogen

# Re-pin: write the versions installed in .venv to constraints.txt.
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v "^-e" | sed "s/^torch==.*/torch==2.13.0/" > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# 10 minutes of concurrent ingest and Score against real processes: no errors, flat RSS, bounded
# stream lag (loadtests/soak.py; not part of `make test`). Trains a quick model set when
# $(SOAK_MODEL_DIR) holds none.
SOAK_MODEL_DIR ?= artifacts/soak-models
.PHONY: soak
soak: $(STAMP)
	$(PY) loadtests/soak.py --duration 600 --model-dir $(SOAK_MODEL_DIR) --data-dir $(IAT_DATA_DIR)/movielens-100k --out artifacts/soak.json
