"""Stages on Ray Train workers (flows/workers.py): a cluster of two Ray nodes on this machine places the workers of a
stage on different nodes; a local Ray runs the smoke flow with 2 workers, a worker killed with SIGKILL fails the run
within a bounded time with nothing registered, and the rerun resumes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlhf_pipeline.flows.workers import WORKERS_DIR
from tests.conftest import PROJECT_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(*args: str, env: dict) -> None:
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _stop_cluster(temp_dir: Path) -> None:
    """Stop the Ray processes of this cluster only (``ray stop`` stops every cluster of the machine): raylets first,
    then the rest, then the GCS server, as ``ray stop`` orders them; what is left after 10 s is killed."""
    import psutil

    def ours() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    for group in ("raylet", None, "gcs_server"):
        for proc in ours():
            line = " ".join(proc.info["cmdline"] or [])
            if group is None and ("raylet" in line or "gcs_server" in line):
                continue
            if group is not None and group not in line:
                continue
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(ours(), timeout=10 if group == "gcs_server" else 3)
    for proc in ours():
        proc.kill()
    assert psutil.wait_procs(ours(), timeout=10)[1] == []


@pytest.fixture()
def two_nodes():
    """A Ray cluster of two nodes on this machine (a head and a second node, one CPU each, token authentication),
    stopped afterwards; yields the head's address and the environment a client needs."""
    temp_dir = Path(f"/tmp/rlhf-ray-{secrets.token_hex(3)}")  # short: Ray puts unix sockets in it
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
    try:
        _ray_cli("start", "--head", "--port", str(port), "--include-dashboard", "false",
                 "--dashboard-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()), *common,
                 env=env)
        _ray_cli("start", "--address", f"127.0.0.1:{port}", "--dashboard-agent-listen-port", str(_free_port()),
                 *common, env=env)
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_cluster(temp_dir)


#: the driver of the two-node test, in its own process (Ray's client state stays out of the test process)
TWO_NODE_DRIVER = """
import json, sys
from pathlib import Path
from rlhf_pipeline.flows.config import load_config
from rlhf_pipeline.flows.stages import STAGE
from rlhf_pipeline.flows.workers import run_stage_function
config = load_config(sys.argv[1], "smoke", json.loads(sys.argv[2]))
result = run_stage_function(STAGE["reward"], config, {"prepared_dir": sys.argv[3], "sft_model_path": sys.argv[4]},
                            Path(sys.argv[5]), None)
print("RESULT " + json.dumps(result.metrics))
"""


def test_a_stage_on_two_ray_nodes_places_its_workers_apart(two_nodes, prepared_data, tiny_model_path, tmp_path):
    """The reward stage (head mode: feature extraction shared out over the workers) with 2 workers, one per node."""
    address, env = two_nodes
    overrides = ["reward.mode=head", "reward.max_train_pairs=12", "reward.max_eval_pairs=8",
                 "reward.max_judge_pairs=12", "distributed.workers=2", "distributed.workers_per_node=1",
                 f"distributed.ray_address={address}", "distributed.timeout_s=120"]
    out = tmp_path / "reward"
    proc = subprocess.run([sys.executable, "-c", TWO_NODE_DRIVER, str(PROJECT_ROOT / "params.yaml"),
                           json.dumps(overrides), str(prepared_data), str(tiny_model_path), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    workers = [json.loads(p.read_text()) for p in sorted((out / WORKERS_DIR).glob("rank-*.json"))]
    assert [w["rank"] for w in workers] == [0, 1] and all(w["world_size"] == 2 for w in workers)
    assert workers[0]["node_id"] != workers[1]["node_id"]  # one worker on each Ray node
    assert metrics["workers"] == 2.0 and metrics["eval_pairs"] == 8.0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and (out / "model" / "config.json").is_file()


def _kill_when(path_glob: Path, pattern: str, folder: Path, rank: int, timeout: float, record: dict) -> None:
    """Wait until ``path_glob`` has a match of ``pattern`` and ``rank``'s pid file exists, then SIGKILL that worker."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid_file = folder / WORKERS_DIR / f"rank-{rank}.json"
        if list(path_glob.glob(pattern)) and pid_file.exists():
            pid = json.loads(pid_file.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            record["killed_at"] = time.time()
            record["pid"] = pid
            return
        time.sleep(0.2)
    record["timeout"] = True


def test_smoke_flow_on_two_ray_workers_survives_a_killed_worker(tmp_path, shared_data, tiny_model_path):
    """The smoke flow with ``distributed.workers=2`` on a local Ray: a PPO worker SIGKILLed after the first checkpoint
    fails the run within a bounded time and nothing is registered; the rerun reuses SFT and the RM, resumes PPO from
    its checkpoint on 2 workers and finishes every stage, registering the challenger."""
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from tests.integration.test_pipeline_smoke import _run_flow, make_project

    project = make_project(tmp_path / "project", shared_data)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["distributed.workers=2", "distributed.timeout_s=60", "ppo.steps=3", "ppo.checkpoint_every=1",
                 "evaluate.num_prompts=4"]
    output = str(tmp_path / "run")
    record: dict = {}
    try:
        with prefect_test_harness(server_startup_timeout=120):
            ppo = Path(output) / "ppo"
            killer = threading.Thread(target=_kill_when, args=(ppo / "checkpoints", "step-000001", ppo, 1, 900,
                                                               record), daemon=True)
            killer.start()
            with pytest.raises(Exception, match="ppo failed on 2 workers"):
                _run_flow(project, output, overrides)
            failed_at = time.time()
            killer.join()
            assert "killed_at" in record, "no PPO checkpoint appeared"
            assert failed_at - record["killed_at"] < 90  # a dead worker fails the stage, it does not hang
            summary = json.loads((Path(output) / "summary.json").read_text())
            assert summary["failed_stage"] == "ppo" and summary["stages"]["ppo"]["status"] == "failed"
            assert summary["registered_models"] == []
            assert MlflowClient().search_registered_models() == []

            summary = _run_flow(project, output, overrides)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        import ray

        ray.shutdown()
    stages = summary["stages"]
    assert stages["sft"]["status"] == "reused" and stages["reward"]["status"] == "reused"
    assert stages["ppo"]["status"] == stages["evaluate"]["status"] == "completed"
    assert stages["ppo"]["metrics"]["resumed_from_step"] >= 1.0 and stages["ppo"]["metrics"]["steps"] == 3.0
    for stage in ("sft", "reward", "ppo", "evaluate"):
        assert stages[stage]["metrics"]["workers"] == 2.0, stage
    assert [m["name"] for m in summary["registered_models"]] == ["rlhf-reward-model-smoke", "rlhf-policy-smoke"]
    assert summary["promotion"]["promoted"] is True
