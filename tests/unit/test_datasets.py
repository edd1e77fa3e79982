"""Canonical datasets on disk (tasks/datasets.py): write, load, version, atomic replacement."""

from __future__ import annotations

import json

import pytest

from rlhf_pipeline.tasks.datasets import data_version, load_prepared, write_prepared
from rlhf_pipeline.tasks.ingest import IngestResult
from tests.conftest import MALFORMED


def test_write_load_and_version(tmp_path, real_result):
    paths = write_prepared(real_result, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "comparisons.parquet", "demonstrations.parquet", "prompts.parquet", "report.json"]
    assert paths["comparisons"] == tmp_path / "a" / "comparisons.parquet"
    write_prepared(real_result, tmp_path / "b")
    version = data_version(tmp_path / "a")
    assert len(version) == 12 and int(version, 16) >= 0
    assert data_version(tmp_path / "b") == version

    report = json.loads(paths["report"].read_text())
    assert report["data_version"] == version
    assert report["counts"]["comparisons"]["total"] == 1992
    assert sum(report["counts"]["comparisons"]["splits"].values()) == 1992
    assert [(r["row"], r["rule"]) for r in report["invalid"]] == sorted(MALFORMED.items())
    assert "Human" not in paths["report"].read_text()  # no dialogue text in the report

    loaded = load_prepared(tmp_path / "a", "comparisons")
    original = real_result.frames["comparisons"]
    assert loaded["prompt"].tolist() == original["prompt"].tolist()
    assert isinstance(loaded["prompt"][0], list) and isinstance(loaded["prompt"][0][0], dict)
    assert isinstance(loaded["responses"][0], list) and isinstance(loaded["responses"][0][0], str)
    assert loaded["responses"].tolist() == original["responses"].tolist()
    assert loaded["source_row"].tolist() == original["source_row"].tolist()
    test_rows = load_prepared(tmp_path / "a", "comparisons", split="test")
    assert set(test_rows["split"]) == {"test"} and len(test_rows) == (original["split"] == "test").sum()
    demos = load_prepared(tmp_path / "a", "demonstrations")
    assert demos["response"].tolist() == real_result.frames["demonstrations"]["response"].tolist()

    changed = {k: v.copy() for k, v in real_result.frames.items()}
    responses = changed["comparisons"]["responses"].tolist()
    responses[5] = [responses[5][0] + "!", responses[5][1]]
    changed["comparisons"]["responses"] = responses
    write_prepared(IngestResult(frames=changed, invalid=real_result.invalid), tmp_path / "c")
    assert data_version(tmp_path / "c") != version


def test_write_prepared_is_atomic(tmp_path, real_result):
    broken = {k: v.copy() for k, v in real_result.frames.items()}
    broken["prompts"] = broken["prompts"].assign(prompt=5)  # cannot be written as messages
    with pytest.raises(TypeError):
        write_prepared(IngestResult(frames=broken), tmp_path / "prepared")
    assert list(tmp_path.iterdir()) == []  # no folder, no temp leftovers

    write_prepared(real_result, tmp_path / "prepared")
    version = data_version(tmp_path / "prepared")
    with pytest.raises(TypeError):
        write_prepared(IngestResult(frames=broken), tmp_path / "prepared")
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
    assert data_version(tmp_path / "prepared") == version  # the previous dataset is intact


def test_load_prepared_missing_says_to_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="rlhf prepare") as info:
        load_prepared(tmp_path, "comparisons")
    assert "comparisons.parquet" in str(info.value)
    with pytest.raises(FileNotFoundError, match="rlhf prepare"):
        data_version(tmp_path)


def test_runs_read_an_immutable_content_addressed_version(tmp_path, real_result):
    """Issue 11, item 1: a run reads data/versions/<data version>, a copy that a later prepare never changes."""
    from rlhf_pipeline.tasks.datasets import snapshot_version, versions_dir

    write_prepared(real_result, tmp_path / "data" / "prepared")
    version = data_version(tmp_path / "data" / "prepared")
    first = snapshot_version(tmp_path / "data" / "prepared")
    assert first == versions_dir(tmp_path / "data" / "prepared") / version == tmp_path / "data" / "versions" / version
    assert snapshot_version(tmp_path / "data" / "prepared") == first  # idempotent
    assert all(not (p.stat().st_mode & 0o222) for p in first.iterdir())  # read-only files

    changed = {k: v.copy() for k, v in real_result.frames.items()}
    changed["comparisons"] = changed["comparisons"].iloc[:-10]
    write_prepared(IngestResult(frames=changed, invalid=[]), tmp_path / "data" / "prepared")  # a new version published
    second = snapshot_version(tmp_path / "data" / "prepared")
    assert second != first and data_version(first) == version  # the version a run was reading is untouched
    assert len(load_prepared(first, "comparisons")) == 1992

    report = json.loads((tmp_path / "data" / "prepared" / "report.json").read_text())
    report["data_version"] = "0" * 12  # a folder whose files and report disagree is refused
    (tmp_path / "data" / "prepared" / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="inconsistent"):
        snapshot_version(tmp_path / "data" / "prepared")


def test_the_same_data_gives_the_same_report_on_every_machine(tmp_path, shared_data):
    """Issue 11, item 4: report.json (part of the DVC output) holds no absolute path: the same sources in two checkouts
    at different places give byte-identical prepared folders, so a fresh checkout's `dvc repro` leaves dvc.lock as
    committed."""
    import shutil

    from rlhf_pipeline.tasks.validate import DataConfig, SourceConfig, run_validate

    reports = []
    for checkout in ("first/checkout", "elsewhere/deeper/clone"):
        data = tmp_path / checkout / "shared"
        data.mkdir(parents=True)
        shutil.copy(shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl", data / "seed_tasks.jsonl")
        config = DataConfig(comparisons=[], demonstrations=[SourceConfig(name="seed", path=str(data / "seed_tasks.jsonl"))],
                            min_rows={"demonstrations": 1, "comparisons": 0, "prompts": 0})
        run_validate(config, prepared_dir=tmp_path / checkout / "prepared")
        reports.append((tmp_path / checkout / "prepared" / "report.json").read_bytes())
    assert reports[0] == reports[1]
    assert str(tmp_path) not in reports[0].decode()
    sources = json.loads(reports[0])["sources"]
    assert [(s["name"], s["file"], len(s["sha256"])) for s in sources] == [("seed", "seed_tasks.jsonl", 64)]
