"""The reward stage's checkpoints (tasks/reward.py, tasks/checkpoints.py): atomic, two kept, matched to the configuration."""

from __future__ import annotations

import json

import torch


def test_reward_checkpoints_are_atomic_keep_two_and_match_the_configuration(tmp_path):
    from rlhf_pipeline.tasks.reward import latest_reward_checkpoint, save_reward_checkpoint

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
