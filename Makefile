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

.PHONY: install demo smoke test test-fast clean services services-stop label-studio label-studio-stop

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## the main job: the demo profile on the real data with SmolLM2-135M-Instruct
	$(BIN)/rlhf run --profile demo

smoke: $(STAMP)  ## the whole pipeline on the tiny model in about a minute
	$(BIN)/rlhf run --profile smoke

test: $(STAMP) browser  ## lint, then unit, real-data, integration and UI tests
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder --durations=15

# Headless Chromium for tests/ui: Debian's package (Playwright drives it; it downloads no browser of its own).
.PHONY: browser
SUDO := $(shell test "$$(id -u)" -eq 0 || echo sudo)
browser:
	@test -x /usr/bin/chromium || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
		|| { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not integration"

services: $(STAMP)  ## real Prefect + MLflow servers in the background (PostgreSQL when it answers at :5432, else SQLite)
	$(BIN)/python -m rlhf_pipeline.infra.services start

services-stop:  ## stop what `make services` started
	$(BIN)/python -m rlhf_pipeline.infra.services stop

# Label Studio for the rankings (`rlhf collect --label-studio`): its own venv and a migrated data template, built once
# and cached in ~/.cache/rlhf-pipeline; bound to 127.0.0.1, telemetry off, data in .label-studio/ (LABEL_STUDIO_DATA_DIR).
# The first start creates the admin from LABEL_STUDIO_PASSWORD and LABEL_STUDIO_API_KEY (see README).
LABEL_STUDIO_PORT ?= 8080
label-studio: $(STAMP)  ## start Label Studio on 127.0.0.1:$(LABEL_STUDIO_PORT) in the background
	$(BIN)/python -m rlhf_pipeline.infra.label_studio start --port $(LABEL_STUDIO_PORT)

label-studio-stop:  ## stop what `make label-studio` started (by its PID)
	$(BIN)/python -m rlhf_pipeline.infra.label_studio stop

clean:
	rm -rf runs mlruns mlartifacts mlflow.db data/prepared data/versions
