"""MLflow tracking (flows/tracking.py): credentials never shown or stored, runs of dead processes closed, an unusable
store refused in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from rlhf_pipeline.flows import tracking

SECRET = "s3cret-pw"


@pytest.mark.parametrize("uri, shown", [
    (f"http://alice:{SECRET}@mlflow.example:5000", "http://alice:***@mlflow.example:5000"),
    (f"https://{SECRET}@mlflow.example/api", "https://***@mlflow.example/api"),  # a bare token as the user-info
    (f"postgresql://mlflow:{SECRET}@db:5432/mlflow?sslmode=require&password={SECRET}",
     "postgresql://mlflow:***@db:5432/mlflow?sslmode=require&password=***"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_uris_are_redacted(uri, shown):
    assert tracking.redact_uri(uri) == shown
    assert tracking.redact_text(f"API request to {uri} failed") == f"API request to {shown} failed"


def test_no_password_in_what_is_shown_or_stored(tmp_path):
    """Issue 11, item 12: summary.json (its tracking URI, error and hint), every Prefect artifact link and the MLflow
    hint the CLI prints carry the URI without its password."""
    from rlhf_pipeline.flows.artifacts import stage_markdown
    from rlhf_pipeline.flows.cli import _console, _print_summary
    from rlhf_pipeline.flows.summary import Summary

    uri = f"http://alice:{SECRET}@mlflow.example:5000"
    link = tracking.run_link(uri, "1", "abc")
    assert SECRET not in link and "alice:***@mlflow.example:5000" in link
    assert SECRET not in stage_markdown("sft", "completed", {"loss": 1.0}, link)
    summary = Summary(tmp_path / "summary.json")
    summary.update(tracking_uri=uri, error=f"MlflowException: API request to {uri}/api failed", hint=uri,
                   mlflow_parent_run_id="p", prefect_flow_run_id="f")
    text = (tmp_path / "summary.json").read_text()
    assert SECRET not in text and "alice:***@" in text
    console = _console()
    with console.capture() as captured:
        _print_summary(console, json.loads(text) | {"data": {"version": "v"}}, tmp_path, 60.0)
    assert SECRET not in captured.get() and "MLFLOW_TRACKING_USERNAME" in captured.get()


def test_runs_of_a_dead_process_are_closed_on_the_next_run(mlflow_uri):
    """Issue 11, item 6 (MLflow): a pipeline run whose process died without closing it (SIGKILL) and its stage runs
    are marked KILLED by the next run of the project (setup_mlflow); runs of live processes stay RUNNING."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment(f"stale-{uuid.uuid4().hex[:8]}")
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    import psutil

    dead_tags = {**tracking.process_tags(), "rlhf.pid": str(dead.pid),
                 "rlhf.pid_started": f"{psutil.Process(dead.pid).create_time():.3f}"}
    dead.wait()
    parent = client.create_run(experiment, tags={"rlhf.kind": "pipeline", **dead_tags}).info.run_id
    stage = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "rlhf.stage": "sft"}).info.run_id
    done = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "rlhf.stage": "validate"}).info.run_id
    client.set_terminated(done, "FINISHED")
    live = client.create_run(experiment, tags={"rlhf.kind": "pipeline", **tracking.process_tags()}).info.run_id

    assert sorted(tracking.close_stale_runs(experiment)) == sorted([parent, stage])
    assert [client.get_run(r).info.status for r in (parent, stage, done, live)] == \
        ["KILLED", "KILLED", "FINISHED", "RUNNING"]
    assert "ended without closing this run" in client.get_run(parent).data.tags["rlhf.closed_stale"]
    assert tracking.close_stale_runs(experiment) == []


def test_an_unusable_store_is_refused_in_one_line(tmp_path):
    """Issue 11, item 7: the check before any work (no HTTP retries)."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as info:
        tracking.check_tracking_store(f"http://bob:{SECRET}@127.0.0.1:{port}", timeout_s=3)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and SECRET not in message and f"bob:***@127.0.0.1:{port}" in message
    with pytest.raises(tracking.TrackingUnavailable, match="does not exist"):
        tracking.check_tracking_store(f"sqlite:///{tmp_path}/missing/mlflow.db")
    tracking.check_tracking_store(f"sqlite:///{tmp_path}/mlflow.db")  # the file is created on first use
