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
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ[key] = value
os.environ.pop("PREFECT_API_URL", None)
# `dvc` and the DVC stage's `python` are this environment's
_BIN = os.path.dirname(sys.executable)
if not os.environ.get("PATH", "").startswith(_BIN):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import gzip  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from rlhf_pipeline.tasks.ingest import IngestResult, ingest  # noqa: E402
from rlhf_pipeline.tasks.validate import DataConfig, SourceConfig  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


#: How `make test` spreads the suite over two pytest-xdist workers (``-n 2 --dist loadgroup --no-loadscope-reorder``).
#: Every module is one work unit (its module fixtures run once), modules that share a session fixture are one unit
#: (one local Ray at a time; one Label Studio server), and the units start longest first (seconds measured on the
#: 2-core machine, `--durations=0`), so that the two workers end close together. Without ``-n`` only the order changes.
SHARED_UNITS = {"test_ray.py": "ray", "test_feedback_loop.py": "label-studio", "test_label_studio_ui.py": "label-studio",
                "test_pipeline_smoke.py": "smoke", "test_mlflow_ui.py": "smoke"}
UNIT_SECONDS = {"ray": 270, "smoke": 230, "label-studio": 120,
                "tests/integration/test_resume.py": 130, "tests/integration/test_real_servers.py": 125,
                "tests/integration/test_distributed.py": 75,
                "tests/integration/test_cli.py": 50, "tests/integration/test_data_versions.py": 41,
                "tests/integration/test_kill.py": 30}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    def unit(item) -> str:
        module = item.nodeid.split("::")[0]
        return SHARED_UNITS.get(Path(module).name, module)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(unit(item)))
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (-UNIT_SECONDS.get(unit(item), 0), order[id(item)]))


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
    from rlhf_pipeline.models.loading import ensure_tiny_random

    return ensure_tiny_random()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from rlhf_pipeline.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, shared_data) -> Path:
    """The real data through the gate into a temporary prepared folder (once per test session)."""
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.tasks.validate import run_validate

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke")
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    # the shared data only: not the rankings a developer may have imported into this checkout (optional sources)
    data = config.data.model_copy(update={"comparisons": [s for s in config.data.comparisons if not s.optional]})
    run_validate(data, prepared_dir=out)
    return out


#: the malformed rows of the real HH-RLHF file (1-based line -> rule)
MALFORMED = {
    87: "empty_reply",
    517: "empty_reply",
    926: "empty_reply",
    1104: "empty_reply",
    1255: "prompt_mismatch",
    1689: "prompt_mismatch",
    1951: "prompt_mismatch",
    1953: "prompt_mismatch",
}
FEW = {"demonstrations": 1, "comparisons": 1, "prompts": 1}


@pytest.fixture(scope="session")
def hh_rows(shared_data: Path) -> list[dict]:
    """The real HH-RLHF rows as published (JSON objects)."""
    with gzip.open(shared_data / "hh-rlhf-harmless" / "comparisons.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def real_config(shared_data: Path) -> DataConfig:
    """A data section over the real files."""
    return DataConfig(
        comparisons=[SourceConfig(name="hh-rlhf-harmless", format="hh_rlhf",
                                  path=str(shared_data / "hh-rlhf-harmless" / "comparisons.jsonl.gz"))],
        demonstrations=[SourceConfig(name="instruction-seed-tasks", format="auto",
                                     path=str(shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl"))],
    )


@pytest.fixture(scope="session")
def real_result(real_config: DataConfig) -> IngestResult:
    """The real files ingested (once per test session)."""
    return ingest(real_config)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write ``rows`` as JSON lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def small_data_config(tmp_path: Path, comparisons: list[SourceConfig] | None = None,
            demonstrations: list[SourceConfig] | None = None) -> DataConfig:
    """A data section over small hand-made files (one demonstration unless given), with tiny row minimums."""
    if demonstrations is None:
        demo = write_jsonl(tmp_path / "demos.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi!"}])
        demonstrations = [SourceConfig(name="demos", path=str(demo))]
    return DataConfig(comparisons=comparisons or [], demonstrations=demonstrations, min_rows=FEW)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio server for the session: its own venv and a migrated data template (both cached under
    ~/.cache/rlhf-pipeline, built on first use), a data directory copied from the template, a free port on 127.0.0.1,
    a throwaway admin and API token. Stopped by its PID at the end."""
    import secrets
    from types import SimpleNamespace

    from rlhf_pipeline.infra import label_studio as ls

    credentials = {"username": "admin@localhost", "password": secrets.token_hex(8), "api_key": secrets.token_hex(20)}
    server = ls.start(tmp_path_factory.mktemp("label-studio") / "data", ls.free_port(), credentials=credentials)
    try:
        yield SimpleNamespace(url=server.url, pid=server.pid, data_dir=server.data_dir, **credentials)
    finally:
        ls.stop_pid(server.pid)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """One MLflow tracking store and registry on SQLite for the unit tests that need a real one (created once: its
    migrations take seconds). Yields the URI; the global tracking URI points at it while a test uses it."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().search_experiments()  # creates the schema
    mlflow.set_tracking_uri(previous)
    yield uri


@pytest.fixture()
def mlflow_uri(mlflow_store, monkeypatch):
    """The shared SQLite store as this test's tracking URI (``MLFLOW_TRACKING_URI`` and MLflow's global URI)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    mlflow.set_tracking_uri(mlflow_store)
    yield mlflow_store
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server (Prefect's own test harness) for the flows of this test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def first_smoke_run(tmp_path_factory, shared_data, tiny_model_path, prefect_server):
    """The smoke flow's first run in a fresh project (git + DVC) on the first 1,800 real comparisons, into MLflow on
    SQLite: the start of the project-lifecycle test, which goes on from here, and what the MLflow UI tests look at
    (one run for both). ``snapshot_uri`` is a copy of the store as this run left it, before anything else runs;
    ``later_rows`` are the file's remaining lines, the new data of the lifecycle's scheduled retrain."""
    import shutil
    from types import SimpleNamespace

    from tests.integration.test_pipeline_smoke import FIRST_ROWS, _run_flow, make_project

    root = tmp_path_factory.mktemp("smoke")
    lines = gzip.open(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz", "rt").read().splitlines(keepends=True)
    incoming = root / "incoming" / "comparisons.jsonl"
    incoming.parent.mkdir()
    incoming.write_text("".join(lines[:FIRST_ROWS]))
    project = make_project(root / "project", shared_data, comparisons=incoming)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        summary = _run_flow(project, "runs/first")
    shutil.copy(root / "mlflow.db", root / "mlflow-after-first-run.db")
    return SimpleNamespace(root=root, project=project, incoming=incoming, uri=uri, summary=summary,
                           snapshot_uri=f"sqlite:///{root / 'mlflow-after-first-run.db'}",
                           later_rows="".join(lines[FIRST_ROWS:]))


@pytest.fixture(scope="session")
def random_rm(tiny_model_path, tmp_path_factory) -> str:
    """A reward model with a random head on the tiny model and its tokenizer (seed 11): scores that differ between
    responses, for the SFT selection and the evaluation tests."""
    import torch

    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.models.reward_model import ScalarHeadModel

    folder = tmp_path_factory.mktemp("random-rm") / "rm"
    torch.manual_seed(11)
    ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu")).save_pretrained(folder)
    load_tokenizer(tiny_model_path).save_pretrained(folder)
    return str(folder)
