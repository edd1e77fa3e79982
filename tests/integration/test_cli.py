"""`rlhf validate` as a user runs it: real files, real GX, exit codes and the rows it names."""

from __future__ import annotations

import gzip
import json

from typer.testing import CliRunner

from rlhf_pipeline.flows.cli import app
from tests.conftest import PROJECT_ROOT, write_jsonl

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


def test_user_data_and_paths_are_printed_literally(tmp_path, hh_rows):
    """Issue 11, item 9: square brackets in a file name or a column name are text, not terminal markup; a budget
    failure names its column, its bound and the setting."""
    folder = tmp_path / "[red]exports"
    folder.mkdir()
    rows = [dict(r) for r in hh_rows[:60]]
    long_reply = " ".join(["word"] * 700)
    for row in rows[:10]:  # 10 of 60 replies over a budget of 512 tokens: more than the 1% the gate lets through
        row["chosen"] = row["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: " + long_reply
    data = write_jsonl(folder / "export[bold].jsonl", rows)
    result = runner.invoke(app, ["validate", "--config", str(PROJECT_ROOT / "params.yaml"), "--data", str(data)])
    assert result.exit_code == 1, result.output
    assert "[red]exports/export[bold].jsonl" in result.output
    assert "ExpectColumnValuesToBeBetween [n_response_tokens] (expected max_value=512, data.max_response_tokens" \
        in result.output
    assert "export_bold_.jsonl row 1 " in result.output  # the source's name in the report: the file name, made safe


def test_validate_data_drops_a_bad_first_row_like_ingestion(tmp_path, hh_rows):
    """Issue 11, item 10: `rlhf validate --data` detects the format as ingestion does; a bad first row is one dropped
    row, numbered as everywhere else."""
    data = tmp_path / "first-bad.jsonl"
    data.write_text('{"chosen": "x", \n' + "".join(json.dumps(r) + "\n" for r in hh_rows[:60]))
    result = runner.invoke(app, ["validate", "--config", str(PROJECT_ROOT / "params.yaml"), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output and "first-bad.jsonl row 1 id None: invalid_json" in result.output


def test_unreachable_mlflow_fails_in_seconds_without_its_password(tmp_path, monkeypatch):
    """Issue 11, items 7 and 12: an MLflow server that does not answer fails the run before any work, in seconds (not
    after minutes of HTTP retries), in one line that names the URI without its password and no file that does not
    exist."""
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret-pw@127.0.0.1:{port}")
    out = tmp_path / "out"
    start = time.monotonic()
    result = runner.invoke(app, ["run", "--profile", "smoke", "--config", str(PROJECT_ROOT / "params.yaml"),
                                 "--output-dir", str(out)])
    took = time.monotonic() - start
    assert result.exit_code == 1, result.output
    assert took < 20, took
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"http://alice:***@127.0.0.1:{port}" in lines[0] and "unreachable" in lines[0]
    assert "s3cret-pw" not in result.output and "summary.json" not in result.output
    assert not out.exists()
    for command in (["promote", "--rollback"], ["lineage", "rlhf-policy@champion"], ["retrain"]):
        result = runner.invoke(app, [*command, "--config", str(PROJECT_ROOT / "params.yaml")])
        assert result.exit_code == 1 and "s3cret-pw" not in result.output and "unreachable" in result.output, command
