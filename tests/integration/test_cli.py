"""`rlhf validate` as a user runs it: real files, real GX, exit codes and the rows it names."""

from __future__ import annotations

import gzip
import json

from typer.testing import CliRunner

from rlhf_pipeline.flows.cli import app
from tests.conftest import PROJECT_ROOT

runner = CliRunner()


def test_validate_real_comparisons_passes_and_reports_dropped_rows(shared_data):
    result = runner.invoke(app, ["validate", "--config", str(PROJECT_ROOT / "params.yaml"),
                                 "--data", str(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz")])
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output
    assert "'comparisons': 1992" in result.output
    for row in (87, 517, 926, 1104, 1255, 1689, 1951, 1953):
        assert f"row {row} " in result.output


def test_validate_strict_fails_naming_rows_and_rules(shared_data):
    result = runner.invoke(app, ["validate", "--config", str(PROJECT_ROOT / "params.yaml"), "--strict",
                                 "--data", str(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz")])
    assert result.exit_code == 1
    assert "validation failed" in result.output
    assert "87" in result.output and "empty_reply" in result.output
    assert "1255" in result.output and "prompt_mismatch" in result.output


def test_validate_bad_file_fails_without_printing_its_text(tmp_path, shared_data):
    rows = [json.loads(line) for line in gzip.open(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz", "rt")][:60]
    secret = "SECRET-MARKER-TEXT"
    for row in rows[:5]:
        row["chosen"] = row["rejected"] = f"\n\nHuman: {secret}\n\nAssistant: same reply"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["validate", "--config", str(PROJECT_ROOT / "params.yaml"), "--data", str(bad)])
    assert result.exit_code == 1
    assert "bad.jsonl" in result.output
    assert secret not in result.output


def test_validate_missing_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["validate", "--config", str(PROJECT_ROOT / "params.yaml"),
                                 "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "data file not found" in result.output and "nope.jsonl" in result.output


def test_run_configuration_errors_are_one_clear_line(tmp_path):
    params = str(PROJECT_ROOT / "params.yaml")
    cases = [
        (["run", "--config", str(tmp_path / "missing.yaml")], "configuration file not found"),
        (["run", "--config", params, "--profile", "huge"], "unknown profile 'huge'"),
        (["run", "--config", params, "--set", "ppo.steps=abc"], "ppo.steps"),
        (["run", "--config", params, "--set", "ppo.stepz=3"], "ppo.stepz"),
        (["run", "--config", params, "--set", "nonsense"], "section.key=value"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_validate_edge_files(tmp_path):
    params = str(PROJECT_ROOT / "params.yaml")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["validate", "--config", params, "--data", str(empty)])
    assert result.exit_code == 1 and "holds no rows" in result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "x", \n')
    result = runner.invoke(app, ["validate", "--config", params, "--data", str(broken)])
    assert result.exit_code == 1 and "row 1" in result.output and "invalid_json" in result.output
    result = runner.invoke(app, ["validate", "--config", params, "--data", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output
    result = runner.invoke(app, ["validate", "--config", params, "--data", str(empty), "--kind", "foo"])
    assert result.exit_code == 2  # not a kind: refused, not silently validating something else
    bad_yaml = tmp_path / "params.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    result = runner.invoke(app, ["run", "--config", str(bad_yaml)])
    assert result.exit_code == 2 and "is not valid YAML" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["run", "--config", params, "--set", "ppo.mini_batch_size=3"])
    assert result.exit_code == 2 and "must divide" in result.output
    result = runner.invoke(app, ["run", "--config", params, "--set", "ppo.steps=-3"])
    assert result.exit_code == 2 and "ppo.steps" in result.output
