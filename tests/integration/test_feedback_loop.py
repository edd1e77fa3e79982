"""The human-feedback loop against a real Label Studio server (session fixture ``label_studio``), real Prefect
(temporary server), MLflow (SQLite) and DVC (git + dvc init in a temp dir):

``rlhf collect --profile smoke --label-studio URL`` samples a labeling batch from ``rlhf-policy-smoke@champion`` and
imports it into a new ranking project (a second collect imports nothing new); an annotator who signed up through the
invite link ranks the tasks through the API (one skips); a partial ranking makes ``rlhf import-rankings`` refuse the
whole export; once fixed, the rankings are appended as K-wise rows and ``dvc add``ed (a second import adds nothing);
``rlhf retrain --profile smoke`` then prepares a new data version holding them, registers a new challenger, and the
summary and the lineage name the labeling batch.

Time on 2 busy CPU cores: Label Studio starts from the cached template in ~5-10 s; the retrain (a trimmed smoke
profile) is most of the test.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml
from typer.testing import CliRunner

from rlhf_pipeline.flows.cli import app
from tests.conftest import PROJECT_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

HH_ROWS = 400  # enough for every split and the smoke stages; the gate runs in seconds


def make_project(root: Path, shared_data: Path) -> Path:
    """A user's project: params.yaml and dvc.yaml of this repo (the first HH_ROWS real comparisons, the human-feedback
    dependency kept), the code the DVC stage depends on, ``git init`` and ``dvc init``."""
    root.mkdir(parents=True)
    lines = gzip.open(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz", "rt").read().splitlines(keepends=True)
    hh = root / "incoming" / "comparisons.jsonl"
    hh.parent.mkdir()
    hh.write_text("".join(lines[:HH_ROWS]))
    demonstrations = shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl"
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["data"]["comparisons"][0]["path"] = str(hh)
    params["data"]["demonstrations"][0]["path"] = str(demonstrations)
    # the smoke profile cut further (one SFT epoch, one PPO step, no checkpoints, 4 evaluation prompts): this test is
    # about the data loop; the full smoke profile runs in test_pipeline_smoke.py
    smoke = params["profiles"]["smoke"]
    smoke["sft"].update(epochs=1, checkpoint_every=0)
    smoke["reward"].update(checkpoint_every=0)
    smoke["ppo"].update(steps=1, checkpoint_every=0)
    smoke["evaluate"].update(num_prompts=4)
    assert params["data"]["comparisons"][1]["name"] == params["collect"]["feedback_source"] == "human-feedback"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    deps = dvc["stages"]["prepare"]["deps"]
    assert "data/feedback/comparisons.jsonl" in deps
    dvc["stages"]["prepare"]["deps"] = [str(hh), str(demonstrations)] + [d for d in deps if not d.startswith("..")]
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    (root / "tasks").mkdir()
    for dep in deps:
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


def register_champion(project: Path, model_dir: Path, name: str) -> int:
    """Register ``model_dir`` as ``name`` and point ``champion`` at it (what a first promoted run leaves behind)."""
    import mlflow
    from mlflow import MlflowClient

    from rlhf_pipeline.flows import registry, tracking

    experiment = tracking.setup_mlflow(project, "rlhf-pipeline")
    staged = project.parent / "seed-champion" / "model"  # a stage's model folder is named `model`, as registry expects
    shutil.copytree(model_dir, staged)
    model_dir = staged
    with mlflow.start_run(experiment_id=experiment, run_name="seed-champion"):
        entry = registry.log_and_register(model_dir, "policy", name, {"rlhf.base_model": "tiny-random"})
    MlflowClient().set_registered_model_alias(name, registry.CHAMPION, str(entry.version))
    return entry.version


def signup_annotator(url: str, admin_token: str, email: str, password: str) -> tuple[int, str]:
    """A second user, as a labeler joins: the organisation's invite link, the sign-up form; returns (id, token)."""
    invite = requests.get(f"{url}/api/invite", headers={"Authorization": f"Token {admin_token}"}, timeout=30).json()
    session = requests.Session()
    page = f"{url}/user/signup/?token={invite['token']}"
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', session.get(page, timeout=30).text).group(1)
    answer = session.post(page, data={"csrfmiddlewaretoken": csrf, "email": email, "password": password},
                          headers={"Referer": page}, allow_redirects=False, timeout=30)
    assert answer.status_code == 302, answer.text[:500]
    token = session.get(f"{url}/api/current-user/token", timeout=30).json()["token"]
    me = requests.get(f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {token}"}, timeout=30).json()
    return me["id"], token


def annotate(url: str, token: str, task_id: int, ranking: list[str] | None) -> int:
    """Submit a ranking (best first), or skip the task when ``ranking`` is None, as the labeling page does."""
    body = ({"result": [], "was_cancelled": True} if ranking is None else
            {"result": [{"from_name": "rank", "to_name": "responses", "type": "ranker",
                         "value": {"ranker": {"rank": ranking}}}], "lead_time": 9.5})
    answer = requests.post(f"{url}/api/tasks/{task_id}/annotations/", json=body,
                           headers={"Authorization": f"Token {token}"}, timeout=30)
    assert answer.status_code == 201, answer.text[:500]
    return answer.json()["id"]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_collect_rank_import_retrain(tmp_path, monkeypatch, shared_data, tiny_model_path, prefect_server,
                                     label_studio):
    from mlflow import MlflowClient

    from rlhf_pipeline.tasks.datasets import data_version, load_prepared

    project = make_project(tmp_path / "project", shared_data)
    config = str(project / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.api_key)
    assert register_champion(project, tiny_model_path, "rlhf-policy-smoke") == 1
    url = label_studio.url

    # 1. collect: K = 4 responses for 4 train prompts from rlhf-policy-smoke@champion, into a new ranking project
    code, output = cli("collect", "--profile", "smoke", "--config", config, "--label-studio", url)
    assert code == 0, output
    batch_id = re.search(r"labeling batch (b[0-9a-f]{12}) \(sampled\): 4 tasks from policy rlhf-policy-smoke/1",
                         output).group(1)
    assert "Label Studio: 4 tasks imported, 0 already there" in output
    assert label_studio.api_key not in output
    batch = json.loads((project / f"data/feedback/batches/{batch_id}.json").read_text())
    assert batch["policy"]["uri"] == "models:/rlhf-policy-smoke/1" and batch["sampling"]["k"] == 4
    assert batch["prompts"]["split"] == "train" and batch["prompts"]["chosen"] == 4
    for task in batch["tasks"]:
        ids = [r["id"] for r in task["responses"]]
        assert len(set(r["text"] for r in task["responses"])) == 4 and all(r["text"] for r in task["responses"])
        assert sorted(task["display_order"]) == sorted(ids) and task["display_order"] != ids
    v0 = data_version(project / "data/prepared")  # collect prepared the data (dvc repro prepare) to draw prompts
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id],
                                filter_string=f"tags.`rlhf.batch_id` = '{batch_id}'")
    assert run.data.tags["rlhf.policy_version"] == "rlhf-policy-smoke/1" and run.data.metrics["tasks"] == 4.0
    assert [a.path for a in client.list_artifacts(run.info.run_id, "labeling_batch")] == [
        f"labeling_batch/{batch_id}.json"]

    # the same collect again: the same batch, nothing sampled or imported twice
    code, output = cli("collect", "--profile", "smoke", "--config", config, "--label-studio", url)
    assert code == 0 and f"labeling batch {batch_id} (reused)" in output, output
    assert "Label Studio: 0 tasks imported, 4 already there" in output

    # 2. the project in Label Studio: our tasks, the ranking configuration, responses in each task's display order
    admin = {"Authorization": f"Token {label_studio.api_key}"}
    (project_ls,) = [p for p in requests.get(f"{url}/api/projects/", headers=admin, timeout=30).json()["results"]
                     if p["title"] == "rlhf-ranking"]
    exported = requests.get(f"{url}/api/projects/{project_ls['id']}/export", headers=admin, timeout=30,
                            params={"exportType": "JSON", "download_all_tasks": "true"}).json()
    by_ext = {t["data"]["ext_id"]: t for t in exported}
    assert sorted(by_ext) == sorted(t["task_id"] for t in batch["tasks"])
    for task in batch["tasks"]:
        assert [r["id"] for r in by_ext[task["task_id"]]["data"]["responses"]] == task["display_order"]

    # 3. an annotator ranks three tasks (the reverse of what was shown) and skips the fourth
    annotator, token = signup_annotator(url, label_studio.api_key, "labeler@localhost", "labeler-pass-123")
    expected = {}
    for task in batch["tasks"][:3]:
        ranking = list(reversed(task["display_order"]))
        annotate(url, token, by_ext[task["task_id"]]["id"], ranking)
        texts = {r["id"]: r["text"] for r in task["responses"]}
        expected[task["task_id"]] = [texts[r] for r in ranking]
    annotate(url, token, by_ext[batch["tasks"][3]["task_id"]]["id"], None)
    # ... and the admin submits a partial ranking of the third task (Label Studio accepts it)
    partial_task = batch["tasks"][2]
    partial = annotate(url, label_studio.api_key, by_ext[partial_task["task_id"]]["id"], partial_task["display_order"][:3])

    # 4. import: refused whole, naming the task and the rule; nothing written
    feedback = project / "data/feedback/comparisons.jsonl"
    code, output = cli("import-rankings", "--label-studio", url, "--config", config, "--profile", "smoke")
    assert code == 1 and f"rule incomplete_ranking: 1 tasks: {partial_task['task_id']}" in output, output
    assert not feedback.exists() or feedback.read_text() == ""
    # the partial annotation deleted, the import goes through
    requests.delete(f"{url}/api/annotations/{partial}/", headers=admin, timeout=30).raise_for_status()
    code, output = cli("import-rankings", "--label-studio", url, "--config", config, "--profile", "smoke",
                       "--batch", batch_id)
    assert code == 0, output
    assert "3 new ranked comparisons" in output and "1 skipped (cancelled) annotations set aside" in output
    assert f"batch {batch_id}: 3 rows (policy rlhf-policy-smoke/1)" in output and "dvc add" in output
    rows = [json.loads(line) for line in feedback.read_text().splitlines()]
    assert {r["task_id"]: r["responses"] for r in rows} == expected
    assert all(r["annotators"] == [f"label-studio:{annotator}"] and r["batch_id"] == batch_id for r in rows)
    assert (project / "data/feedback/comparisons.jsonl.dvc").is_file()
    before = feedback.read_bytes()
    code, output = cli("import-rankings", "--label-studio", url, "--config", config, "--profile", "smoke")
    assert code == 0 and "0 new ranked comparisons" in output and "3 imported before" in output, output
    assert feedback.read_bytes() == before

    # 5. retrain: a new data version with the K-wise rows, a new challenger, the batch in summary and lineage
    code, output = cli("retrain", "--profile", "smoke", "--config", config)
    assert code == 0, output
    assert f"labeling batch {batch_id} in the data: 3 ranked comparisons (policy rlhf-policy-smoke/1)" in output
    (summary_file,) = (project / "runs").glob("smoke-*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["data"]["version"] != v0 and summary["data"]["version"] == data_version(project / "data/prepared")
    assert summary["data"]["labeling_batches"] == [{"batch_id": batch_id, "rows": 3,
                                                    "policy_version": "rlhf-policy-smoke/1"}]
    comparisons = load_prepared(project / "data/prepared", "comparisons")
    ranked = comparisons[comparisons["source"] == "human-feedback"]
    assert sorted(map(list, ranked["responses"])) == sorted(expected.values())
    policy = next(m for m in summary["registered_models"] if m["name"] == "rlhf-policy-smoke")
    assert policy["version"] == 2 and "challenger" in policy["aliases"]
    version = client.get_model_version("rlhf-policy-smoke", "2")
    assert version.tags["rlhf.labeling_batches"] == batch_id
    assert version.tags["rlhf.data_version"] == summary["data"]["version"]
    code, output = cli("lineage", "rlhf-policy-smoke/2", "--config", config)
    assert code == 0 and f"human rankings from labeling batches {batch_id}" in output, output
