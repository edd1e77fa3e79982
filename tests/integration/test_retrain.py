"""`rlhf-retrain` on real data through real Prefect, MLflow (SQLite) and DVC: new rows make a new data version and a new
challenger; no change skips training and says so in a Prefect artifact."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.integration.test_pipeline_smoke import make_project

pytestmark = pytest.mark.integration

FIRST_ROWS = 1800  # the rest of the 2,000 real comparisons arrive later as "new data"


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_retrain_skips_unchanged_data_and_trains_on_new_rows(tmp_path, shared_data, prefect_server, monkeypatch,
                                                             tiny_model_path):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.retrain import rlhf_retrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    lines = gzip.open(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz", "rt").read().splitlines(keepends=True)
    source = tmp_path / "incoming" / "comparisons.jsonl"
    source.parent.mkdir()
    source.write_text("".join(lines[:FIRST_ROWS]))
    project = make_project(tmp_path / "project", shared_data, comparisons=source)

    first = rlhf_retrain(profile="smoke", project_dir=str(project), output_dir="runs/r1")
    assert first["skipped"] is False
    assert all(first["stages"][s]["status"] == "completed" for s in ("sft", "reward", "ppo", "evaluate"))
    assert first["promotion"]["promoted"] is True  # the first challenger becomes champion
    assert first["stages"]["sft"]["metrics"]["selection"] == "eval_loss"  # no champion RM yet

    # the schedule fires again with nothing new: no stage runs, the artifact says why
    result = CliRunner().invoke(app, ["retrain", "--profile", "smoke", "--config", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "retrain skipped" in result.output and first["data"]["version"] in result.output
    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'rlhf-policy-smoke'")) == 1
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rlhf-retrain"])))
    assert any(a.data.startswith("**skipped**: nothing changed since the last successful run") for a in artifacts)

    # 200 new real rows arrive: a new data version, the whole pipeline re-runs, a new challenger is gated
    with open(source, "a") as fh:
        fh.write("".join(lines[FIRST_ROWS:]))
    new = rlhf_retrain(profile="smoke", project_dir=str(project), output_dir="runs/r3")
    assert new["skipped"] is False
    assert new["data"]["version"] != first["data"]["version"]
    assert new["data"]["comparisons"] > first["data"]["comparisons"]
    assert all(new["stages"][s]["status"] == "completed" for s in ("sft", "reward", "ppo", "evaluate"))
    # the retrain's SFT checkpoint is picked by the champion reward model (App. C.1)
    sft = new["stages"]["sft"]["metrics"]
    assert sft["selection"] == "mean_rm_score" and isinstance(sft["selection_rm_score"], float)
    assert sft["selection_reward_model"] == "models:/rlhf-reward-model-smoke/1"
    assert {m["name"]: m["version"] for m in new["registered_models"]} == \
        {"rlhf-policy-smoke": 2, "rlhf-reward-model-smoke": 2}
    assert new["promotion"]["figures"]["has_champion"] is True
    version = client.get_model_version("rlhf-policy-smoke", "2")
    assert version.tags["rlhf.data_version"] == new["data"]["version"]
    assert version.tags["rlhf.promotion.decision"] in ("promoted", "rejected")
    summary = json.loads((project / "runs/r3/summary.json").read_text())
    assert summary["data"]["version"] == new["data"]["version"]
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rlhf-retrain"])))
    assert any(a.data.startswith("**retrained** (data_version ") and new["data"]["version"] in a.data
               for a in artifacts)
