# The two commands of the README: `make demo` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo smoke test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## the main job: the demo profile on the real data with SmolLM2-135M-Instruct
	$(BIN)/rlhf run --profile demo

smoke: $(STAMP)  ## the whole pipeline on the tiny model in about a minute
	$(BIN)/rlhf run --profile smoke

test: $(STAMP)  ## unit, data and integration tests
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

clean:
	rm -rf runs mlruns mlartifacts mlflow.db data/prepared
