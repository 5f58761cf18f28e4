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
	$(PY) -m pytest -q -rs --durations=15

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

# Load test and benchmark report (loadtests/). Both need a quick MovieLens export for the source
# model and schema: trained here once (about a minute) unless IAT_TEST_MODEL_DIR names one.
QUICK_MODELS ?= $(if $(IAT_TEST_MODEL_DIR),$(IAT_TEST_MODEL_DIR),loadtests/out/models-quick)
LOADTEST_ARGS ?= --duration 60s --users 8 --spawn-rate 4
BENCH_ARGS ?=
FEAST_VENV := .venv-feast
.PHONY: loadtest bench-models

loadtests/out/models-quick/iat: | $(STAMP)
	$(VENV)/bin/iat train --dataset movielens-100k --data-dir $(IAT_DATA_DIR)/movielens-100k --out loadtests/out/run-quick --quick --epochs 1 --max-users 300
	$(VENV)/bin/iat export --from loadtests/out/run-quick --out loadtests/out/models-quick --no-aoti

bench-models: $(STAMP) $(QUICK_MODELS)/iat

# Locust headless against sequencer + source + ranking on loopback: loadtests/out/locust_*.csv + locust-summary.md
loadtest: bench-models
	$(PY) -m loadtests.run --quick-models $(QUICK_MODELS) $(LOADTEST_ARGS)

# Feast pins protobuf/pandas/pyarrow: its own virtualenv, so .venv stays as pinned.
$(FEAST_VENV)/.installed:
	test -x $(FEAST_VENV)/bin/python || $(PYTHON) -m venv $(FEAST_VENV)
	$(FEAST_VENV)/bin/pip install -q --disable-pip-version-check "feast[redis]==0.67.0"
	touch $@

# Score/ingest benchmarks + naive and Feast peers, one run -> loadtests/RESULTS.md (its own section).
bench: bench-models $(FEAST_VENV)/.installed
	$(PY) -m loadtests.report --out loadtests/RESULTS.md --quick-models $(QUICK_MODELS) $(BENCH_ARGS)
