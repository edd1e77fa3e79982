"""`rlhf import-rankings --export FILE` into a real DVC project (git + dvc init in a temp dir): rows appended and
`dvc add`ed, the same export twice adds nothing, a malformed export is refused whole and leaves the file and its
.dvc file byte for byte as they were, a batch nobody knows is refused (MLflow on SQLite is asked for it first)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from rlhf_pipeline.flows.cli import app
from tests.conftest import PROJECT_ROOT
from tests.unit.test_feedback import annotation, export_task, make_batch

pytestmark = pytest.mark.integration


@pytest.fixture()
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    batch = make_batch()
    (root / "data/feedback/batches").mkdir(parents=True)
    (root / "data/feedback/batches/bTEST.json").write_text(json.dumps(batch))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return root


def _import(project, export: list) -> tuple[int, str]:
    path = project / "export.json"
    path.write_text(json.dumps(export))
    result = CliRunner().invoke(app, ["import-rankings", "--export", str(path), "--config", str(project / "params.yaml")])
    return result.exit_code, result.output


def test_import_rankings_from_an_export_file_into_dvc(project):
    batch = make_batch()
    feedback = project / "data/feedback/comparisons.jsonl"
    tracked = project / "data/feedback/comparisons.jsonl.dvc"
    first = [export_task(batch, 0, [annotation(11, 1, ["d1", "a1", "c1", "b1"])]),
             export_task(batch, 1, [annotation(12, 1, None, cancelled=True)])]
    code, output = _import(project, first)
    assert code == 0, output
    assert "1 new ranked comparisons" in output and "batch bTEST: 1 rows (policy rlhf-policy/3)" in output
    assert "1 skipped (cancelled) annotations set aside" in output and "dvc add data/feedback/comparisons.jsonl" in output
    (row,) = [json.loads(line) for line in feedback.read_text().splitlines()]
    assert row["responses"] == ["Seven.", "Red.", "Green.", "Blue."] and row["batch_id"] == "bTEST"
    assert row["annotators"] == ["label-studio:1"] and row["policy_version"] == "rlhf-policy/3"
    status = subprocess.run(["dvc", "status", str(tracked)], cwd=project, capture_output=True, text=True)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    before = (feedback.read_bytes(), tracked.read_bytes())

    # the same export again adds nothing
    code, output = _import(project, first)
    assert code == 0 and "0 new ranked comparisons" in output and "1 imported before" in output, output
    assert (feedback.read_bytes(), tracked.read_bytes()) == before

    # a partial ranking of the second task: refused whole, nothing written
    partial = [first[0], export_task(batch, 1, [annotation(13, 2, ["c2", "a2", "d2"])])]
    code, output = _import(project, partial)
    assert code == 1 and "rule incomplete_ranking: 1 tasks: bTEST-t2" in output and "nothing was written" in output
    assert (feedback.read_bytes(), tracked.read_bytes()) == before

    # a batch that is neither a batch file nor logged to MLflow
    stranger = export_task(batch, 0, [])
    stranger["data"] = {**stranger["data"], "batch_id": "bNOBODY", "ext_id": "bNOBODY-t1"}
    code, output = _import(project, [stranger])
    assert code == 1 and "rule unknown_batch: 1 tasks: bNOBODY-t1" in output, output
    assert (feedback.read_bytes(), tracked.read_bytes()) == before

    # the second task ranked properly: one more row, a new DVC hash
    complete = [first[0], export_task(batch, 1, [annotation(13, 2, ["c2", "a2", "d2", "b2"])])]
    code, output = _import(project, complete)
    assert code == 0 and "1 new ranked comparisons" in output and "1 imported before" in output, output
    lines = feedback.read_text().splitlines()
    assert len(lines) == 2 and feedback.read_bytes().startswith(before[0])  # appended, the first row untouched
    assert json.loads(lines[1])["responses"] == ["A dog.", "A cat.", "Seven.", "Blue."]
    assert tracked.read_bytes() != before[1]

    # a corrupt feedback file is never rewritten
    feedback.write_text(feedback.read_text() + "{not json\n")
    corrupt = feedback.read_bytes()
    code, output = _import(project, complete)
    assert code == 1 and "comparisons.jsonl: row 3: rule invalid_json" in output, output
    assert feedback.read_bytes() == corrupt


def test_import_needs_exactly_one_source(project):
    result = CliRunner().invoke(app, ["import-rankings", "--config", str(project / "params.yaml")])
    assert result.exit_code == 2 and "exactly one of --label-studio URL and --export FILE" in result.output
    code, output = _import(project, {"not": "an export"})
    assert code == 1 and "rule not_a_label_studio_export" in output
