"""PPO killed with SIGKILL and resumed ends with the same metrics and weights as an uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration

RUN_PPO = """
import json, sys
from flows.config import load_config
from tasks.ppo import run_ppo
cfg = load_config(sys.argv[1], "smoke", json.loads(sys.argv[2]))
run_ppo(cfg, sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
"""
OVERRIDES = ["ppo.steps=4", "ppo.checkpoint_every=1", "ppo.batch_size=4", "ppo.mini_batch_size=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, prepared_data, tiny_model_path):
    """Prepared real data, the tiny model as SFT model, and a reward model built from it."""
    from models.loading import load_tokenizer
    from models.reward_model import ScalarHeadModel

    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    rm = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"))
    rm.save_pretrained(root / "rm")
    load_tokenizer(tiny_model_path).save_pretrained(root / "rm")
    return prepared_data, str(tiny_model_path), str(root / "rm")


def _run(inputs, out: Path):
    from flows.config import load_config
    from tasks.ppo import run_ppo

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", OVERRIDES)
    prepared, sft, rm = inputs
    return run_ppo(config, prepared, sft, rm, out)


def _start_and_kill_at(inputs, out: Path, checkpoint: str, timeout: float = 300) -> None:
    prepared, sft, rm = inputs
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_PPO, str(PROJECT_ROOT / "params.yaml"), json.dumps(OVERRIDES), str(prepared), sft,
         rm, str(out)],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    target = out / "checkpoints" / checkpoint / "state.pt"
    while not target.exists():
        assert proc.poll() is None, "the PPO process ended before the checkpoint to kill at"
        assert time.time() < deadline, f"no {target} after {timeout}s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _same(a, b) -> None:
    keys = ("kl", "mean_reward", "mean_reward_first", "mean_total_reward", "response_length", "approx_kl")
    assert {k: a.metrics[k] for k in keys} == pytest.approx({k: b.metrics[k] for k in keys}, abs=1e-5)
    wa = load_file(Path(a.paths["model"]) / "model.safetensors")
    wb = load_file(Path(b.paths["model"]) / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_ppo_resume_after_sigkill_matches_uninterrupted_run(inputs, tmp_path):
    reference = _run(inputs, tmp_path / "uninterrupted")
    assert reference.metrics["resumed_from_step"] == 0.0

    _start_and_kill_at(inputs, tmp_path / "killed", "step-000002")
    resumed = _run(inputs, tmp_path / "killed")
    assert resumed.metrics["resumed_from_step"] >= 2.0  # it did resume...
    assert resumed.metrics["steps"] == 4.0
    _same(reference, resumed)  # ...and ended where the uninterrupted run ended
    history = json.loads(Path(resumed.paths["history"]).read_text())
    assert len(history) == 4


def test_ppo_killed_after_the_last_step_still_finishes(inputs, tmp_path):
    """Killed at the boundary after the last step's checkpoint: the resumed run does no new step but still writes the
    model and the same metrics (it must not silently produce nothing)."""
    reference = _run(inputs, tmp_path / "uninterrupted")
    _start_and_kill_at(inputs, tmp_path / "killed", "step-000004")
    import shutil

    shutil.rmtree(tmp_path / "killed" / "model", ignore_errors=True)  # as if killed before the model was written
    resumed = _run(inputs, tmp_path / "killed")
    assert resumed.metrics["resumed_from_step"] == 4.0
    assert (Path(resumed.paths["model"]) / "model.safetensors").exists()
    _same(reference, resumed)
