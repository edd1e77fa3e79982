"""PPO, SFT and the reward model killed with SIGKILL and resumed end with the same metrics and weights as an
uninterrupted run (CPU, same seed), including a kill at an epoch boundary and one after the last step."""

from __future__ import annotations

import json
import os
import shutil
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
from rlhf_pipeline.flows.config import load_config
from rlhf_pipeline.tasks.ppo import run_ppo
cfg = load_config(sys.argv[1], "smoke", json.loads(sys.argv[2]))
run_ppo(cfg.ppo, cfg.model, sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
"""
OVERRIDES = ["ppo.steps=4", "ppo.checkpoint_every=1", "ppo.batch_size=4", "ppo.mini_batch_size=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, prepared_data, tiny_model_path):
    """Prepared real data, the tiny model as SFT model, and a reward model built from it."""
    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.models.reward_model import ScalarHeadModel

    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    rm = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"))
    rm.save_pretrained(root / "rm")
    load_tokenizer(tiny_model_path).save_pretrained(root / "rm")
    return prepared_data, str(tiny_model_path), str(root / "rm")


def _run(inputs, out: Path):
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.tasks.ppo import run_ppo

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", OVERRIDES)
    prepared, sft, rm = inputs
    return run_ppo(config.ppo, config.model, prepared, sft, rm, out)


def _start_and_kill_at(inputs, out: Path, checkpoint: str, timeout: float = 300) -> None:
    prepared, sft, rm = inputs
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_PPO, str(PROJECT_ROOT / "params.yaml"), json.dumps(OVERRIDES), str(prepared), sft,
         rm, str(out)],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    target = out / "checkpoints" / checkpoint / "state.json"
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


# --- SFT and the reward model: the same check for the other two training stages -----------------------------------

RUN_STAGE = """
import json, sys
from rlhf_pipeline.flows.config import load_config
cfg = load_config(sys.argv[1], "smoke", json.loads(sys.argv[2]))
stage, prepared, model, out, rm = sys.argv[3:8]
if stage == "sft":
    from rlhf_pipeline.tasks.sft import run_sft
    run_sft(cfg.sft, cfg.model, prepared, model, out, selection_reward_model=rm or None)
else:
    from rlhf_pipeline.tasks.reward import run_reward
    run_reward(cfg.reward, cfg.model, prepared, model, out)
"""
# 8 demonstrations in batches of 2 (over-long ones lose the start of their prompt): 4 steps an epoch, 2 epochs
SFT_OVERRIDES = ["sft.checkpoint_every=1", "sft.epochs=2", "sft.max_examples=8", "sft.batch_size=2",
                 "sft.eval_examples=4", "sft.selection_prompts=2"]
# 8 train pairs in batches of 4: 2 steps an epoch, 2 epochs; no normalisation pass (not what is tested, and slow)
RM_OVERRIDES = ["reward.checkpoint_every=1", "reward.epochs=2", "reward.max_train_pairs=8", "reward.max_eval_pairs=8",
                "reward.max_judge_pairs=8", "reward.normalize=false"]


def _kill_when(args: list[str], target: Path, errors: Path, timeout: float = 300) -> None:
    """Run ``RUN_STAGE`` with ``args`` in a subprocess (stderr to ``errors``) and SIGKILL it once ``target`` exists."""
    with open(errors, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", RUN_STAGE, *args], cwd=PROJECT_ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + timeout
        while not target.exists():
            if proc.poll() is not None:
                tail = errors.read_text(errors="replace")[-3000:]
                pytest.fail(f"the stage ended (rc {proc.returncode}) before {target} appeared\n{tail}")
            assert time.time() < deadline, f"no {target} after {timeout}s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


class _Recorder:
    """A MetricLogger that keeps every ``(name, step) -> value``."""

    def __init__(self):
        self.values: dict[tuple[str, int], float] = {}

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.values.update({(k, step): v for k, v in metrics.items()})

    def curve(self, name: str) -> dict[int, float]:
        return {step: v for (k, step), v in self.values.items() if k == name}


def _same_stage(a, b, models: tuple[str, ...] = ("model",)) -> None:
    """Equal metrics (all but wall time and the resume point) and equal weights."""
    skip = {"wall_s", "resumed_from_step"}
    ma = {k: v for k, v in a.metrics.items() if k not in skip}
    mb = {k: v for k, v in b.metrics.items() if k not in skip}
    assert ma.keys() == mb.keys()
    for key, value in ma.items():
        if isinstance(value, str):
            assert value == mb[key], key
        else:
            assert mb[key] == pytest.approx(value, abs=1e-5), key
    for name in models:
        wa = load_file(Path(a.paths[name]) / "model.safetensors")
        wb = load_file(Path(b.paths[name]) / "model.safetensors")
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5, name


def _sft(inputs, out: Path, log=None):
    """SFT on the tiny model, epochs selected by the (random) test RM's mean score."""
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.tasks.sft import run_sft

    prepared, base, rm = inputs
    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", SFT_OVERRIDES)
    return run_sft(config.sft, config.model, prepared, base, out, log or (lambda m, s: None), selection_reward_model=rm)


@pytest.fixture(scope="module")
def sft_reference(inputs, tmp_path_factory):
    """The uninterrupted SFT run and its recorded metrics."""
    recorder = _Recorder()
    result = _sft(inputs, tmp_path_factory.mktemp("sft-reference") / "uninterrupted", recorder)
    assert result.metrics["resumed_from_step"] == 0.0
    return result, recorder


def _drop_newer(folders, step: int) -> None:
    """Remove checkpoint folders (name ending in ``-N``) after ``step``: the kill is as if exactly at ``step`` even
    when the process got further before the signal landed."""
    for folder in folders:
        if int(folder.name.rsplit("-", 1)[1]) > step:
            shutil.rmtree(folder)


def _kill_sft(inputs, out: Path, step: int) -> None:
    """Run SFT in a subprocess and SIGKILL it once the checkpoint after ``step`` is complete (its folder appears
    whole: tasks/checkpoints.py renames it into place), as if exactly then."""
    prepared, base, rm = inputs
    args = [str(PROJECT_ROOT / "params.yaml"), json.dumps(SFT_OVERRIDES), "sft", str(prepared), base, str(out), rm]
    _kill_when(args, out / "checkpoints" / f"step-{step:06d}" / "state.json", out.parent / "stderr.txt")
    _drop_newer((out / "checkpoints").glob("step-*"), step)


def test_sft_resume_at_an_epoch_boundary_matches_uninterrupted_run(inputs, sft_reference, tmp_path):
    """Killed right after the checkpoint of epoch 1's last step: the checkpoint already holds epoch 1's evaluation,
    the resumed run trains epoch 2 only and ends like the uninterrupted run."""
    reference, ref_log = sft_reference
    per_epoch = int(reference.metrics["steps"]) // 2
    assert per_epoch == 4 and reference.metrics["train_examples"] == 8.0

    _kill_sft(inputs, tmp_path / "killed", per_epoch)
    saved = json.loads((tmp_path / "killed" / "checkpoints" / f"step-{per_epoch:06d}" / "state.json").read_text())
    assert saved["step"] == per_epoch and len(saved["history"]) == per_epoch
    assert [h["epoch"] for h in saved["selector"]["history"]] == [1.0]  # the epoch's evaluation came before its checkpoint
    assert saved["selector"]["has_weights"]  # and the selector's copy of epoch 1's weights is in its tensors
    recorder = _Recorder()
    resumed = _sft(inputs, tmp_path / "killed", recorder)
    assert resumed.metrics["resumed_from_step"] == float(per_epoch)
    assert resumed.metrics["steps"] == reference.metrics["steps"]
    _same_stage(reference, resumed)
    # both epochs were evaluated (one before the kill, one after), and the curves are complete
    for name in ("sft/epoch_eval_loss", "sft/selection_rm_score", "sft/loss"):
        assert recorder.curve(name) == pytest.approx(ref_log.curve(name), abs=1e-5), name
    assert len(recorder.curve("sft/epoch_eval_loss")) == 2


def test_sft_resume_mid_epoch_skips_a_torn_checkpoint(inputs, sft_reference, tmp_path):
    """Killed mid-epoch; the newest checkpoint is made torn (its tensors' DCP metadata missing) and a half-written
    temporary folder of the next is left behind (as a kill during a save leaves it): the torn one is discarded, the
    temporary one removed, and the run resumes from the one before, ending like the uninterrupted run."""
    reference, _ = sft_reference
    checkpoints = tmp_path / "killed" / "checkpoints"
    _kill_sft(inputs, tmp_path / "killed", 2)
    (checkpoints / "step-000002" / "tensors" / ".metadata").unlink()
    shutil.copytree(checkpoints / "step-000001" / "tensors", checkpoints / ".tmp-step-000003" / "tensors")
    resumed = _sft(inputs, tmp_path / "killed")
    assert resumed.metrics["resumed_from_step"] == 1.0
    assert not list(checkpoints.glob(".tmp-*"))
    assert resumed.metrics["steps"] == reference.metrics["steps"]
    _same_stage(reference, resumed)


def test_sft_killed_after_the_last_step_still_finishes(inputs, sft_reference, tmp_path):
    """Killed after the last step's checkpoint, before the model was written: the resumed run trains nothing, restores
    the selected epoch from the checkpoint and writes the same model and metrics (not an empty success)."""
    reference, _ = sft_reference
    last = int(reference.metrics["steps"])
    _kill_sft(inputs, tmp_path / "killed", last)
    shutil.rmtree(tmp_path / "killed" / "model", ignore_errors=True)
    resumed = _sft(inputs, tmp_path / "killed")
    assert resumed.metrics["resumed_from_step"] == float(last)
    assert (Path(resumed.paths["model"]) / "model.safetensors").exists()
    _same_stage(reference, resumed)


def _reward(inputs, out: Path, overrides: list[str], log=None):
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.tasks.reward import run_reward

    prepared, sft, _ = inputs
    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", RM_OVERRIDES + overrides)
    return run_reward(config.reward, config.model, prepared, sft, out, log or (lambda m, s: None))


def test_reward_resume_at_an_epoch_boundary_matches_uninterrupted_run(inputs, tmp_path):
    """Full fine-tuning killed right after the checkpoint of epoch 1's last step: the resumed run draws epoch 2's
    order (seeded by the epoch) and ends with the same metrics and weights."""
    overrides = ["reward.mode=full", "reward.judge=false"]
    ref_log = _Recorder()
    reference = _reward(inputs, tmp_path / "uninterrupted", overrides, ref_log)
    assert reference.metrics["steps"] == 4.0 and reference.metrics["resumed_from_step"] == 0.0

    prepared, sft, _ = inputs
    out = tmp_path / "killed"
    _kill_when([str(PROJECT_ROOT / "params.yaml"), json.dumps(RM_OVERRIDES + overrides), "reward", str(prepared), sft,
                str(out), ""], out / "checkpoints" / "model" / "step-000002" / "state.json", tmp_path / "stderr.txt")
    _drop_newer((out / "checkpoints" / "model").glob("step-*"), 2)
    state = json.loads((out / "checkpoints" / "model" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 2  # at the boundary: 2 steps an epoch
    recorder = _Recorder()
    resumed = _reward(inputs, out, overrides, recorder)
    assert resumed.metrics["resumed_from_step"] == 2.0 and resumed.metrics["steps"] == 4.0
    _same_stage(reference, resumed)
    assert recorder.curve("reward/loss") == pytest.approx(ref_log.curve("reward/loss"), abs=1e-5)


def test_reward_killed_during_the_judge_resumes_both(inputs, tmp_path):
    """Top-layers mode with a judge, killed mid-epoch while the judge trains: the RM's checkpoint after its last step
    is taken as done (no step repeated, same weights and RNG), the judge resumes mid-epoch; both end as uninterrupted."""
    overrides = ["reward.mode=top_layers", "reward.top_layers=1", "reward.judge=true"]
    reference = _reward(inputs, tmp_path / "uninterrupted", overrides)

    prepared, sft, _ = inputs
    out = tmp_path / "killed"
    _kill_when([str(PROJECT_ROOT / "params.yaml"), json.dumps(RM_OVERRIDES + overrides), "reward", str(prepared), sft,
                str(out), ""], out / "checkpoints" / "judge" / "step-000001" / "state.json", tmp_path / "stderr.txt")
    _drop_newer((out / "checkpoints" / "judge").glob("step-*"), 1)
    resumed = _reward(inputs, out, overrides)
    assert resumed.metrics["resumed_from_step"] == 4.0  # the RM was complete
    assert resumed.metrics["steps"] == 4.0
    _same_stage(reference, resumed, models=("model", "judge"))
