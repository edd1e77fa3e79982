"""The smoke profile through real Prefect (temporary server), MLflow (SQLite) and DVC (git + dvc init) in a temp dir:
one project's life: first run, retrain skipped on unchanged data (pulled from a DVC remote), a rerun that reuses every
stage, a PPO-only change, promotion by hand and rollback, lineage and its reproduction, new rows and a retrain."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlhf_pipeline.flows.cli import app
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration

FIRST_ROWS = 1800

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


@pytest.fixture()
def mlflow_sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _run_flow(project: Path, output: str, overrides: list[str] | None = None):
    from rlhf_pipeline.flows.pipeline import rlhf_pipeline

    return rlhf_pipeline(profile="smoke", overrides=overrides, project_dir=str(project), output_dir=output)


def test_smoke_flow_real_prefect_mlflow_dvc(tmp_path, prefect_server, first_smoke_run, monkeypatch):
    import mlflow
    from mlflow import MlflowClient
    from prefect import get_client

    from rlhf_pipeline.tasks.datasets import data_version

    # the first run: the first 1,800 real comparisons (tests/conftest.py); the last 200 arrive later as new data for
    # the scheduled retrain
    project, incoming, summary = first_smoke_run.project, first_smoke_run.incoming, first_smoke_run.summary
    mlflow_sqlite = first_smoke_run.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite)

    # summary.json: the interface other checks read
    on_disk = json.loads((project / "runs/first/summary.json").read_text())
    assert on_disk["mlflow_parent_run_id"] == summary["mlflow_parent_run_id"]
    # rows 87, 517, 926, 1104, 1255 and 1689 of the first 1,800 are malformed and dropped
    assert on_disk["data"]["comparisons"] == FIRST_ROWS - 6 and on_disk["data"]["demonstrations"] == 175
    assert on_disk["stages"]["validate"]["metrics"]["dropped_rows"] == 6.0
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
    assert evaluate["ppl_sft_heldout"] > 1.0 and evaluate["ppl_policy_heldout"] > 1.0
    for key in ("ended_with_eos_policy", "ended_with_eos_sft"):
        assert 0.0 <= evaluate[key] <= 1.0, key
    low, high = evaluate["win_rate_vs_sft_length_controlled_ci"]
    assert low <= evaluate["win_rate_vs_sft_length_controlled"] <= high
    assert isinstance(evaluate["reward_per_token"], float) and "proxy_judge_correlation" in evaluate
    assert evaluate["length_hack"] in (0.0, 1.0) and isinstance(evaluate["headline"], str) and evaluate["headline"]
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
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted([*STAGES, "register", "promote"])
    by_name = {r.data.tags["mlflow.runName"]: r for r in children}
    for stage in STAGES:
        assert by_name[stage].info.run_id == on_disk["stages"][stage]["mlflow_run_id"]
        assert by_name[stage].info.status == "FINISHED"
    assert by_name["reward"].data.metrics["accuracy"] == pytest.approx(reward["accuracy"])
    assert len(client.get_metric_history(by_name["ppo"].info.run_id, "ppo/kl")) == 2
    assert len(client.get_metric_history(by_name["sft"].info.run_id, "sft/loss")) >= 1
    artifacts = [a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id)]
    assert {"ppo_curves.png", "samples_table.json", "report.html"} <= set(artifacts)
    assert "config.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    # Registry: the first versions are challengers; with no champion yet the gates make them champions
    registered = {m["name"]: m for m in on_disk["registered_models"]}
    assert set(registered) == {"rlhf-policy-smoke", "rlhf-reward-model-smoke"}  # the smoke profile's names
    for name in registered:
        assert int(client.get_model_version_by_alias(name, "champion").version) == 1
        assert int(client.get_model_version_by_alias(name, "challenger").version) == 1
    promotion = on_disk["promotion"]
    assert promotion["promoted"] is True and promotion["challenger_version"] == 1
    assert promotion["reasons"][0] == "pass: no champion yet: no win-rate gate"
    assert any(r.startswith("pass: KL to SFT") for r in promotion["reasons"])
    version = client.get_model_version_by_alias("rlhf-policy-smoke", "champion")
    # lineage tags on the version
    assert version.tags["rlhf.base_model"] == "tiny-random" and version.tags["rlhf.profile"] == "smoke"
    assert version.tags["rlhf.data_version"] == on_disk["data"]["version"]
    assert version.tags["rlhf.mlflow_parent_run_id"] == summary["mlflow_parent_run_id"]
    assert version.tags["rlhf.prefect_flow_run_id"] == summary["prefect_flow_run_id"]
    assert version.tags["rlhf.git_commit"] and version.tags["rlhf.params_hash"] and version.tags["rlhf.code_version"]
    assert version.tags["rlhf.reward_model_version"] == "1"
    assert version.tags["rlhf.promotion.decision"] == "promoted"

    # Prefect: the flow run exists on the server and completed; every stage published an artifact
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(summary["prefect_flow_run_id"])
    assert flow_run.state.is_completed()
    task_names = {t.name.rsplit("-", 1)[0] for t in _task_runs(summary["prefect_flow_run_id"])}
    assert {"validate", "sft", "reward", "ppo", "evaluate", "register", "promote"} <= task_names
    artifacts = _artifacts(summary["prefect_flow_run_id"])
    for stage in STAGES:
        assert by_name[stage].info.run_id in artifacts[f"rlhf-{stage}"], stage
    assert "| accuracy |" in artifacts["rlhf-reward"]
    assert "win rate" in artifacts["rlhf-evaluation"]
    assert "**promoted**" in artifacts["rlhf-promotion"]
    report = (project / "runs/first/evaluate/report.html").read_text()
    assert "<h2>PPO over steps</h2>" in report and "data:image/png;base64" in report

    # The prepared data goes to a DVC remote; a machine without it gets it back with `dvc pull` at the next retrain
    store = tmp_path / "dvc-store"
    for command in (["remote", "add", "-d", "store", str(store)], ["push", "-q"]):
        subprocess.run(["dvc", *command], cwd=project, check=True)
    shutil.rmtree(project / "data/prepared")

    # The schedule fires with nothing new: `rlhf retrain` pulls the data, skips training and its artifact says why
    runner = CliRunner()
    result = runner.invoke(app, ["retrain", "--profile", "smoke", "--config", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "retrain skipped" in result.output and on_disk["data"]["version"] in result.output
    assert data_version(project / "data/prepared") == on_disk["data"]["version"]  # pulled back from the remote
    retrain_artifacts = _artifacts_by_key("rlhf-retrain")
    assert any(a.startswith("**skipped**: nothing changed since the last successful run") for a in retrain_artifacts)

    # A second run with nothing changed re-runs no stage but the data gate and registers nothing new
    second = _run_flow(project, "runs/second")
    assert second["data"]["version"] == on_disk["data"]["version"]
    for stage in ("sft", "reward", "ppo", "evaluate"):
        entry = second["stages"][stage]
        assert entry["status"] == "reused", stage
        assert entry["mlflow_run_id"] == on_disk["stages"][stage]["mlflow_run_id"], stage
        assert not (project / "runs/second" / stage).exists()
    assert all(m["reused"] for m in second["registered_models"])
    assert second["promotion"]["skipped"] is True
    assert len(client.search_model_versions("name = 'rlhf-policy-smoke'")) == 1
    assert "reused" in _artifacts(second["prefect_flow_run_id"])["rlhf-sft"]

    # Only a PPO parameter changes: SFT and the RM are reused, PPO and evaluation re-run, a new challenger is gated
    third = _run_flow(project, "runs/third", ["ppo.learning_rate=2.0e-4"])
    assert [third["stages"][s]["status"] for s in ("sft", "reward", "ppo", "evaluate")] == \
        ["reused", "reused", "completed", "completed"]
    assert third["stages"]["sft"]["mlflow_run_id"] == on_disk["stages"]["sft"]["mlflow_run_id"]
    assert (project / "runs/third/ppo/model/model.safetensors").exists()
    assert {m["name"]: m["version"] for m in third["registered_models"]} == \
        {"rlhf-policy-smoke": 2, "rlhf-reward-model-smoke": 2}
    decision = third["promotion"]
    figures = decision["figures"]
    assert figures["has_champion"] is True and 0.0 <= figures["win_rate_vs_champion"] <= 1.0
    low, high = figures["win_rate_vs_champion_ci"]
    assert low <= figures["win_rate_vs_champion"] <= high
    assert decision["previous_champion"] == 1
    champion = int(client.get_model_version_by_alias("rlhf-policy-smoke", "champion").version)
    tags = client.get_model_version("rlhf-policy-smoke", "2").tags
    if decision["promoted"]:
        assert champion == 2 and tags["rlhf.promotion.previous_champion"] == "1"
    else:
        assert champion == 1 and tags["rlhf.promotion.decision"] == "rejected"
    assert tags["rlhf.promotion.kl_to_sft"] == f"{figures['kl_to_sft']:.6g}"

    # rollback (after a promotion by hand, so there is always one to undo) moves both champions back to version 1
    cli = ["--profile", "smoke", "--config", str(project / "params.yaml")]
    result = runner.invoke(app, ["promote", "--version", "2", *cli])
    assert result.exit_code == 0, result.output
    assert int(client.get_model_version_by_alias("rlhf-policy-smoke", "champion").version) == 2
    assert int(client.get_model_version_by_alias("rlhf-reward-model-smoke", "champion").version) == 2
    if not decision["promoted"]:  # the hand promotion replaced version 1
        assert client.get_model_version("rlhf-policy-smoke", "2").tags["rlhf.promotion.previous_champion"] == "1"
    result = runner.invoke(app, ["promote", "--rollback", *cli])
    assert result.exit_code == 0, result.output
    assert "champion 2 → 1" in result.output
    for name in registered:
        assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert client.get_model_version("rlhf-policy-smoke", "2").tags["rlhf.promotion.decision"] == "rolled_back"
    result = runner.invoke(app, ["promote", "--rollback", *cli])  # version 1 replaced nothing
    assert result.exit_code == 1 and "nothing to roll back to" in result.output

    # lineage of the champion: the chain back to data, code and runs
    result = runner.invoke(app, ["lineage", "rlhf-policy-smoke@champion", "--config", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert f"pipeline run {summary['mlflow_parent_run_id']}" in result.output
    assert f"data version {on_disk['data']['version']}" in result.output
    assert f"Prefect flow run {summary['prefect_flow_run_id']}" in result.output
    for stage in STAGES:
        assert f"{stage}: run {on_disk['stages'][stage]['mlflow_run_id']}" in result.output

    # ... and re-running from it (recorded config, no cache, nothing registered) gives the same weights
    versions_before = len(client.search_model_versions("name = 'rlhf-policy-smoke'"))
    result = runner.invoke(app, ["lineage", "rlhf-policy-smoke@champion", "--reproduce", "--config",
                                 str(project / "params.yaml"), "--output-dir", str(project / "runs/reproduce")])
    assert result.exit_code == 0, result.output
    assert "→ reproduced" in result.output
    reproduced = json.loads((project / "runs/reproduce/summary.json").read_text())
    assert all(reproduced["stages"][s]["status"] == "completed" for s in STAGES)
    assert len(client.search_model_versions("name = 'rlhf-policy-smoke'")) == versions_before

    # 200 new real rows arrive: the scheduled retrain makes a new data version, re-runs every stage and gates a new
    # challenger; its SFT checkpoint is picked by the champion reward model (App. C.1)
    from rlhf_pipeline.flows.retrain import rlhf_retrain

    with open(incoming, "a") as fh:
        fh.write(first_smoke_run.later_rows)
    new = rlhf_retrain(profile="smoke", project_dir=str(project), output_dir="runs/retrain")
    assert new["skipped"] is False
    assert new["data"]["version"] != on_disk["data"]["version"]
    assert new["data"]["comparisons"] == 1992  # all 2,000 rows but the 8 malformed ones
    assert all(new["stages"][s]["status"] == "completed" for s in ("sft", "reward", "ppo", "evaluate"))
    sft = new["stages"]["sft"]["metrics"]
    assert sft["selection"] == "mean_rm_score" and isinstance(sft["selection_rm_score"], float)
    assert sft["selection_reward_model"] == "models:/rlhf-reward-model-smoke/1"  # the champion after the rollback
    assert {m["name"]: m["version"] for m in new["registered_models"]} == \
        {"rlhf-policy-smoke": 3, "rlhf-reward-model-smoke": 3}
    assert new["promotion"]["figures"]["has_champion"] is True
    version = client.get_model_version("rlhf-policy-smoke", "3")
    assert version.tags["rlhf.data_version"] == new["data"]["version"]
    assert version.tags["rlhf.promotion.decision"] == ("promoted" if new["promotion"]["promoted"] else "rejected")
    assert any(a.startswith("**retrained** (data_version ") and new["data"]["version"] in a
               for a in _artifacts_by_key("rlhf-retrain"))


def _artifacts_by_key(key: str) -> list[str]:
    """The markdown of every Prefect artifact with ``key``."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        return [a.data for a in prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))]


def _artifacts(flow_run_id: str) -> dict[str, str]:
    """The Prefect artifacts of a flow run, ``{key: markdown}``."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found if a.key}


def _task_runs(flow_run_id: str):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        return prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_bad_data_stops_the_flow_before_training(tmp_path, shared_data, prefect_server, mlflow_sqlite):
    """A comparison file with too many malformed rows fails the GX gate: no training, nothing registered."""
    from mlflow import MlflowClient

    from rlhf_pipeline.tasks.validate import ValidationFailed

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
