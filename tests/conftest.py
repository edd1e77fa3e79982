"""Shared pytest fixtures: quiet offline environment, the real data, the tiny test model."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Quiet and offline (set before prefect / mlflow / transformers are imported by any test module).
_PREFECT_HOME = tempfile.mkdtemp(prefix="rlhf-prefect-home-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ[key] = value
os.environ.pop("PREFECT_API_URL", None)
# `dvc` and the DVC stage's `python` are this environment's
_BIN = os.path.dirname(sys.executable)
if not os.environ.get("PATH", "").startswith(_BIN):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets: ``../shared/data`` beside the project root (see its README)."""
    path = PROJECT_ROOT.parent / "shared" / "data"
    if not (path / "hh-rlhf-harmless" / "comparisons.jsonl.gz").is_file():
        pytest.fail(f"the real data is missing: expected {path}/hh-rlhf-harmless/comparisons.jsonl.gz")
    return path


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny random Llama with SmolLM2's tokenizer (built once into the model cache)."""
    from models.loading import ensure_tiny_random

    return ensure_tiny_random()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from models.loading import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, shared_data) -> Path:
    """The real data through the gate into a temporary prepared folder (once per test session)."""
    from flows.config import load_config
    from tasks.validate import run_validate

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke")
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    run_validate(config.data, prepared_dir=out)
    return out
