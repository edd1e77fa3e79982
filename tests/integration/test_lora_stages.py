"""LoRA in the stages (tasks/reward.py, tasks/ppo.py) on the tiny model and the real data: only adapters (and a scalar
head) train, what is saved is merged full weights that transformers loads alone, and PPO's reference is the policy
with its adapters disabled."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration


def test_reward_and_ppo_with_lora_save_merged_models_transformers_loads(prepared_data, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.tasks.ppo import run_ppo
    from rlhf_pipeline.tasks.reward import run_reward

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", [
        "reward.mode=full", "reward.lora.r=4", "reward.max_train_pairs=8", "reward.max_eval_pairs=4",
        "reward.judge=false", "reward.checkpoint_every=0", "ppo.lora.r=4", "ppo.steps=2", "ppo.batch_size=4",
        "ppo.mini_batch_size=2", "ppo.learning_rate=1.0e-3", "ppo.checkpoint_every=1", "ppo.ptx_coef=0"])
    reward = run_reward(config.reward, config.model, prepared_data, tiny_model_path, tmp_path / "reward")
    rm_folder = tmp_path / "reward" / "model"
    head = AutoModelForSequenceClassification.from_pretrained(rm_folder)  # plain transformers, no peft
    assert not any("lora" in name for name in head.state_dict())
    assert 0.0 <= reward.metrics["accuracy"] <= 1.0

    ppo = run_ppo(config.ppo, config.model, prepared_data, tiny_model_path, rm_folder, tmp_path / "ppo")
    # step 1: the adapters start at zero, so the policy is its reference (the SFT model) and the KL is zero up to the
    # float rounding of generate's cached log-probabilities against a full forward (≤ 2e-5 nats a token)
    import json

    history = json.loads((tmp_path / "ppo" / "history.json").read_text())
    assert abs(history[0]["ppo/kl"]) < 1e-3 and ppo.metrics["steps"] == 2.0
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model")
    assert not any("lora" in name for name in policy.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        moved = float((policy(input_ids=ids).logits - base(input_ids=ids).logits).abs().max())
    assert moved > 1e-4  # the merged adapters changed the policy
    # the checkpoint holds only what trains: the adapters and optimizer states, not the frozen base
    tensors = next((tmp_path / "ppo" / "checkpoints").glob("step-*")) / "tensors"
    assert sum(f.stat().st_size for f in tensors.iterdir()) < 0.2 * (tiny_model_path / "model.safetensors").stat().st_size
