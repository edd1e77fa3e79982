"""The smoke profile through real Prefect (temporary server), MLflow (SQLite) and DVC (git + dvc init) in a temp dir."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration

STAGES = ("validate", "sft", "reward", "ppo", "evaluate")


def make_project(root: Path, shared_data: Path, comparisons: Path | None = None) -> Path:
    """A user's project folder: params.yaml + dvc.yaml of this repo (data paths pointed at ``shared_data``), the code
    the DVC stage depends on, ``git init`` and ``dvc init``."""
    root.mkdir(parents=True)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    comparisons = comparisons or shared_data / "hh-rlhf-harmless" / "comparisons.jsonl.gz"
    demonstrations = shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl"
    params["data"]["comparisons"][0]["path"] = str(comparisons)
    params["data"]["demonstrations"][0]["path"] = str(demonstrations)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    deps = dvc["stages"]["prepare"]["deps"]
    dvc["stages"]["prepare"]["deps"] = [str(comparisons), str(demonstrations)] + [d for d in deps if d.startswith("tasks/")]
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    (root / "tasks").mkdir()
    for dep in dvc["stages"]["prepare"]["deps"]:
        if dep.startswith("tasks/"):
            shutil.copy(PROJECT_ROOT / dep, root / dep)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def mlflow_sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _run_flow(project: Path, output: str):
    from flows.config import load_config
    from flows.pipeline import rlhf_pipeline

    config = load_config(project / "params.yaml", "smoke")
    return rlhf_pipeline(config, project_dir=str(project), output_dir=output)


def test_smoke_flow_real_prefect_mlflow_dvc(tmp_path, shared_data, prefect_server, mlflow_sqlite, tiny_model_path):
    import mlflow
    from mlflow import MlflowClient
    from prefect import get_client

    from tasks.data import data_version

    project = make_project(tmp_path / "project", shared_data)
    summary = _run_flow(project, "runs/first")

    # summary.json: the interface other checks read
    on_disk = json.loads((project / "runs/first/summary.json").read_text())
    assert on_disk["mlflow_parent_run_id"] == summary["mlflow_parent_run_id"]
    assert on_disk["data"]["comparisons"] == 1992 and on_disk["data"]["demonstrations"] == 175
    assert on_disk["data"]["version"] == data_version(project / "data/prepared")
    for stage in STAGES:
        assert on_disk["stages"][stage]["status"] == "completed", stage
    reward = on_disk["stages"]["reward"]["metrics"]
    assert 0.0 <= reward["accuracy"] <= 1.0
    low, high = reward["accuracy_ci"]
    assert low <= reward["accuracy"] <= high
    assert 0.0 <= reward["accuracy_shorter_baseline"] <= 1.0
    assert isinstance(reward["normalization_bias"], float)
    low, high = reward["judge_accuracy_ci"]
    assert low <= reward["judge_accuracy"] <= high and reward["judge_train_pairs"] == 16
    ppo = on_disk["stages"]["ppo"]["metrics"]
    assert ppo["kl"] == ppo["kl"] and ppo["episodes"] == 8  # not NaN; 2 steps x 4 episodes
    evaluate = on_disk["stages"]["evaluate"]["metrics"]
    for key in ("win_rate_vs_sft", "mean_reward_policy", "mean_reward_sft", "kl_to_sft", "ppl_sft", "ppl_policy"):
        assert isinstance(evaluate[key], float), key
    assert 0.0 <= evaluate["win_rate_vs_sft"] <= 1.0
    assert evaluate["ppl_sft"] > 1.0 and evaluate["ppl_policy"] > 1.0
    low, high = evaluate["win_rate_vs_sft_judge_ci"]
    assert low <= evaluate["win_rate_vs_sft_judge"] <= high
    # a random tiny judge cannot beat the shorter-reply baseline with certainty: the verdict must say so
    if not evaluate["judge_informative"]:
        assert "carry no information" in evaluate["judge_verdict"]
    assert (project / "runs/first/reward/judge/model.safetensors").exists()
    assert (project / "runs/first/ppo/model/model.safetensors").exists()
    sft = on_disk["stages"]["sft"]["metrics"]
    assert sft["selection"] == "eval_loss" and sft["selected_epoch"] in (1.0, 2.0)  # no champion RM yet

    # DVC versioned the prepared data
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["outs"][0]["path"] == "data/prepared"

    # MLflow: the parent run and one nested run per stage, with metrics
    mlflow.set_tracking_uri(mlflow_sqlite)
    client = MlflowClient()
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rlhf.data_version"] == on_disk["data"]["version"]
    assert parent.data.params["ppo.kl_coef"] == "0.02"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted([*STAGES, "register"])
    by_name = {r.data.tags["mlflow.runName"]: r for r in children}
    for stage in STAGES:
        assert by_name[stage].info.run_id == on_disk["stages"][stage]["mlflow_run_id"]
        assert by_name[stage].info.status == "FINISHED"
    assert by_name["reward"].data.metrics["accuracy"] == pytest.approx(reward["accuracy"])
    assert len(client.get_metric_history(by_name["ppo"].info.run_id, "ppo/kl")) == 2
    assert len(client.get_metric_history(by_name["sft"].info.run_id, "sft/loss")) >= 1
    artifacts = [a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id)]
    assert {"ppo_curves.png", "samples_table.json", "report.html"} <= set(artifacts)

    # Registry: first versions are challenger and champion
    registered = {m["name"]: m for m in on_disk["registered_models"]}
    assert set(registered) == {"rlhf-policy-smoke", "rlhf-reward-model-smoke"}  # the smoke profile's names
    for name in registered:
        version = client.get_model_version_by_alias(name, "champion")
        assert int(version.version) == 1
        assert int(client.get_model_version_by_alias(name, "challenger").version) == 1
    assert sorted(registered["rlhf-policy-smoke"]["aliases"]) == ["challenger", "champion"]
    version = client.get_model_version_by_alias("rlhf-policy-smoke", "champion")
    assert version.tags["rlhf.base_model"] == "tiny-random" and version.tags["rlhf.profile"] == "smoke"
    assert version.tags["rlhf.data_version"] == on_disk["data"]["version"]

    # Prefect: the flow run exists on the server and completed
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(summary["prefect_flow_run_id"])
    assert flow_run.state.is_completed()
    task_names = {t.name.rsplit("-", 1)[0] for t in _task_runs(summary["prefect_flow_run_id"])}
    assert {"validate", "sft", "reward", "ppo", "evaluate", "register"} <= task_names
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rlhf-evaluation"])))
    assert any(str(a.flow_run_id) == summary["prefect_flow_run_id"] and "win rate" in a.data for a in artifacts)
    report = (project / "runs/first/evaluate/report.html").read_text()
    assert "<h2>PPO over steps</h2>" in report and "data:image/png;base64" in report

    # A second run: DVC skips the unchanged prepare stage; new versions are challengers, champion stays at 1
    second = _run_flow(project, "runs/second")
    assert second["data"]["version"] == on_disk["data"]["version"]
    # a retrain picks the SFT epoch by the champion RM's mean score on validation prompts
    assert second["stages"]["sft"]["metrics"]["selection"] == "mean_rm_score"
    assert isinstance(second["stages"]["sft"]["metrics"]["selection_rm_score"], float)
    for name in registered:
        assert int(client.get_model_version_by_alias(name, "champion").version) == 1
        assert int(client.get_model_version_by_alias(name, "challenger").version) == 2


def _task_runs(flow_run_id: str):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        return prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_bad_data_stops_the_flow_before_training(tmp_path, shared_data, prefect_server, mlflow_sqlite):
    """A comparison file with too many malformed rows fails the GX gate: no training, nothing registered."""
    import gzip

    from mlflow import MlflowClient

    from tasks.validate import ValidationFailed

    rows = [json.loads(line) for line in gzip.open(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz", "rt")][:200]
    for row in rows[:20]:  # 10% chosen == rejected: over the 2% the drop policy allows
        row["rejected"] = row["chosen"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    project = make_project(tmp_path / "project", shared_data, comparisons=bad)

    with pytest.raises(ValidationFailed) as failure:
        _run_flow(project, "runs/bad")
    message = str(failure.value)
    assert "row 1" in message or "rows 1" in message or " 1," in message
    summary = json.loads((project / "runs/bad/summary.json").read_text())
    assert summary["stages"]["validate"]["status"] == "failed"
    assert summary["stages"]["sft"]["status"] == "pending"
    assert summary["registered_models"] == []
    assert not (project / "data/prepared").exists()
    client = MlflowClient(tracking_uri=mlflow_sqlite)
    assert client.search_registered_models() == []
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FAILED"
