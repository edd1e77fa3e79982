"""A run killed with SIGKILL leaves nothing behind: its temporary Prefect server dies with it, and the next run of the
project marks its MLflow runs KILLED (real `rlhf run` subprocess, real signals, real Prefect and MLflow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration


def _project(root: Path, shared_data: Path) -> Path:
    """A plain project folder (no DVC: the data is prepared in-process) on 300 real comparisons."""
    root.mkdir(parents=True)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    lines = __import__("gzip").open(shared_data / "hh-rlhf-harmless/comparisons.jsonl.gz", "rt").readlines()
    (root / "comparisons.jsonl").write_text("".join(lines[:300]))
    params["data"]["comparisons"][0]["path"] = str(root / "comparisons.jsonl")
    params["data"]["demonstrations"][0]["path"] = str(shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_a_killed_run_leaves_no_server_and_no_running_runs(tmp_path, shared_data, tiny_model_path):
    """Issue 11, item 6."""
    import psutil
    from mlflow import MlflowClient

    from rlhf_pipeline.flows import tracking

    project = _project(tmp_path / "project", shared_data)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the run starts its own temporary server
    rlhf = Path(sys.executable).parent / "rlhf"
    log = tmp_path / "run.log"
    with open(log, "wb") as output:  # a file, not a pipe: a full pipe would stop the run
        proc = subprocess.Popen([str(rlhf), "run", "--profile", "smoke", "--config", str(project / "params.yaml"),
                                 "--output-dir", str(project / "runs" / "killed")], env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(tracking_uri=uri)
    started = None
    deadline = time.monotonic() + 300
    try:
        while started is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            if not (project / "mlflow.db").exists():
                continue
            try:
                experiment = client.get_experiment_by_name("rlhf-pipeline")
                runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") \
                    if experiment else []
            except Exception:  # the store is being created
                continue
            if any(r.data.tags.get("rlhf.stage") for r in runs):  # a stage run is open: the run is well under way
                started = runs
        assert started, f"the run did not reach a stage:\n{log.read_text()[-3000:]}"
        children = psutil.Process(proc.pid).children(recursive=True)
        server = [c for c in children if "uvicorn" in " ".join(c.cmdline())]
        assert server, [c.cmdline() for c in children]  # Prefect's temporary API server
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(server, timeout=20)
        assert not alive, f"left running after the kill: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    parent = next(r for r in started if r.data.tags.get("rlhf.kind") == "pipeline")
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # nobody closed it

    # the next run of the project (any rlhf command that opens its store) closes what the killed one left open
    import mlflow

    previous = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        experiment_id = tracking.setup_mlflow(project, "rlhf-pipeline")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(previous)
    left = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    assert left == []
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    stages = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert stages and all(r.info.status in ("KILLED", "FINISHED") for r in stages)
