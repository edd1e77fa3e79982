"""Checkpoint helpers of SFT and the reward model: what a resume reads back, and which folders it trusts."""

from __future__ import annotations

import json

import pytest
import torch


def test_checkpoint_selector_state_survives_save_and_load(tmp_path):
    from tasks.sft import CheckpointSelector

    model = torch.nn.Linear(2, 1)
    selector = CheckpointSelector()
    for epoch, (weight, loss) in enumerate([(1.0, 1.0), (2.0, 2.0)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        selector.consider(model, loss, epoch, step=3 * epoch)
    selector.save(tmp_path, {"config_hash": "h"})

    restored = CheckpointSelector()
    assert restored.load(tmp_path)["config_hash"] == "h"
    assert (restored.best, restored.best_epoch, restored.history) == (selector.best, 1, selector.history)
    assert restored.history[1]["step"] == 6.0
    restored.restore(model)
    assert model.weight.tolist() == [[1.0, 1.0]]  # epoch 1's weights, read back from the file
    with pytest.raises(ValueError, match="selected by eval_loss"):
        CheckpointSelector(reward_model=object()).load(tmp_path)


def test_latest_sft_checkpoint_skips_torn_and_foreign_folders(tmp_path):
    from tasks.sft import CheckpointSelector, latest_sft_checkpoint

    def folder(step: int, config_hash: str | None, trainer_state: bool = True):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if trainer_state:
            (path / "trainer_state.json").write_text("{}")
        if config_hash is not None:
            CheckpointSelector().save(path, {"config_hash": config_hash})
        return path

    good = folder(2, "h")
    folder(10, "h", trainer_state=False)  # only the selector's file: not a Trainer checkpoint
    folder(12, "other")  # another configuration
    folder(14, None)  # killed between the Trainer's files and the selector's
    older = folder(1, "h")
    assert latest_sft_checkpoint(tmp_path, "h") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [older.name, good.name]  # unusable folders removed
    assert latest_sft_checkpoint(tmp_path / "missing", "h") is None


def test_mean_train_loss_weights_log_entries_by_their_steps():
    from tasks.sft import _mean_train_loss

    history = [{"loss": 4.0, "step": 1}, {"eval_loss": 9.0, "step": 1}, {"loss": 1.0, "step": 4},
               {"train_loss": 0.0, "step": 4}]
    assert _mean_train_loss(history) == pytest.approx((4.0 + 3 * 1.0) / 4)


def test_reward_checkpoints_are_atomic_keep_two_and_match_the_configuration(tmp_path):
    from tasks.reward import latest_reward_checkpoint, save_reward_checkpoint

    model = torch.nn.Linear(2, 1)
    for step in (1, 2, 3):
        save_reward_checkpoint(tmp_path, step, model, {"config_hash": "h" if step < 3 else "other", "step": step})
    (tmp_path / ".tmp-cut-short").mkdir()  # a write that a kill interrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-cut-short", "step-000002", "step-000003"]
    folder, state = latest_reward_checkpoint(tmp_path, "h")
    assert folder.name == "step-000002" and state["step"] == 2
    assert not (tmp_path / ".tmp-cut-short").exists()
    assert latest_reward_checkpoint(tmp_path, "unknown") is None
    assert json.dumps(sorted(p.name for p in folder.iterdir())) == '["model.safetensors", "state.pt"]'
