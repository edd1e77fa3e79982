"""Mixed precision done right (models/precision.py): with ``model.precision: bf16`` (CPU autocast here) the stages keep
fp32 master weights and optimizer states, so at the RLHF learning rate of 1e-5, after 3 steps, the weights that move in
fp32 move in bf16 too (≥ 99% of them), and PPO's EMA shadow (fp32) moves. Pure bf16 weights, the old GPU path, lose
most updates."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration

LR = "1.0e-5"


def _moved(before: dict, after: dict) -> dict[str, torch.Tensor]:
    """Per tensor, the elements that differ (tensors both have)."""
    return {k: before[k] != after[k] for k in before if k in after}


def _kept_in_bf16(base: dict, fp32: dict, bf16: dict) -> float:
    """Of the weight elements that moved in the fp32 run, the fraction that moved in the bf16 run too (embedding rows of
    tokens the batches never hold get no gradient and move in neither)."""
    in_fp32, in_bf16 = _moved(base, fp32), _moved(base, bf16)
    return sum(int((in_fp32[k] & in_bf16[k]).sum()) for k in in_fp32) / sum(int(m.sum()) for m in in_fp32.values())


def _weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_pure_bf16_weights_lose_most_updates():
    """The failure mode the fp32 masters avoid: AdamW at lr 1e-5 on bf16 weights (3 steps) leaves most weights as
    they were, and every norm weight (1.0 ± 1e-5 rounds back to 1.0)."""
    torch.manual_seed(0)
    fp32 = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 1))
    start = {k: v.clone() for k, v in fp32.state_dict().items()}
    bf16 = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 1))
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    start_bf16 = {k: v.clone() for k, v in bf16.state_dict().items()}
    x = torch.randn(32, 64)
    for model, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        for _ in range(3):
            optimizer.zero_grad()
            model(x.to(dtype)).float().pow(2).mean().backward()
            optimizer.step()
    moved_fp32, moved_bf16 = _moved(start, fp32.state_dict()), _moved(start_bf16, bf16.state_dict())
    assert all(bool(m.all()) for m in moved_fp32.values())
    assert sum(int(m.sum()) for m in moved_bf16.values()) / sum(m.numel() for m in moved_bf16.values()) < 0.5
    assert not bool(moved_bf16["1.weight"].any())


def test_reward_model_fine_tuning_in_bf16_moves_what_fp32_moves(prepared_data, tiny_model_path, tmp_path):
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.tasks.reward import run_reward

    runs = {}
    for precision in ("fp32", "bf16"):
        config = load_config(PROJECT_ROOT / "params.yaml", "smoke", [
            f"model.precision={precision}", "reward.mode=full", f"reward.learning_rate={LR}",
            "reward.max_train_pairs=12", "reward.batch_size=4", "reward.judge=false", "reward.normalize=false",
            "reward.checkpoint_every=0", "reward.max_eval_pairs=4"])
        result = run_reward(config.reward, config.model, prepared_data, tiny_model_path, tmp_path / precision)
        assert result.metrics["steps"] == 3.0
        runs[precision] = _weights(tmp_path / precision / "model")
    base = {f"model.{k.removeprefix('model.')}": v for k, v in _weights(tiny_model_path).items()}
    assert _kept_in_bf16(base, runs["fp32"], runs["bf16"]) >= 0.99
    assert all(v.dtype == torch.float32 for v in runs["bf16"].values())  # saved from the fp32 masters


def test_ppo_in_bf16_moves_what_fp32_moves_and_the_ema_moves(prepared_data, tiny_model_path, tmp_path):
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.models.reward_model import ScalarHeadModel
    from rlhf_pipeline.tasks.ppo import run_ppo

    torch.manual_seed(0)
    rm = tmp_path / "rm"
    ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu")).save_pretrained(rm)
    load_tokenizer(tiny_model_path).save_pretrained(rm)
    runs = {}
    for precision, decay in (("fp32", "null"), ("bf16", "null"), ("bf16", "0.992")):
        overrides = [f"model.precision={precision}", f"ppo.learning_rate={LR}", "ppo.steps=3", "ppo.batch_size=4",
                     "ppo.mini_batch_size=4", "ppo.ptx_coef=0", f"ppo.ema_decay={decay}", "ppo.checkpoint_every=0"]
        config = load_config(PROJECT_ROOT / "params.yaml", "smoke", overrides)
        out = tmp_path / f"{precision}-{decay}"
        run_ppo(config.ppo, config.model, prepared_data, tiny_model_path, rm, out)
        runs[(precision, decay)] = _weights(out / "model")
    base = _weights(tiny_model_path)
    assert _kept_in_bf16(base, runs[("fp32", "null")], runs[("bf16", "null")]) >= 0.99
    # the EMA policy (decay 0.992, its shadow kept in fp32) moved by a small fraction of what the trained weights
    # moved: after 3 updates about 1 - 0.992^3 = 2.4% of it (in a bf16 shadow the median move was 0)
    ema, trained = runs[("bf16", "0.992")], runs[("bf16", "null")]
    ratios = torch.cat([((ema[k] - base[k]).abs() / (trained[k] - base[k]).abs())[trained[k] != base[k]].flatten()
                        for k in base])
    assert 0.005 < float(ratios.median()) < 0.1
    assert float((ratios > 0).float().mean()) >= 0.95
