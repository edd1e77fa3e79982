"""LoRA (models/lora.py) on the tiny model: with the adapters disabled the model is exactly the base model (PPO's
reference), the merged model matches the adapted one and loads with transformers alone."""

from __future__ import annotations

import pytest
import torch


def _trained_lora(tiny_model_path, scalar_head: bool = False):
    from rlhf_pipeline.models.loading import load_causal_lm
    from rlhf_pipeline.models.lora import add_lora
    from rlhf_pipeline.models.reward_model import ScalarHeadModel

    torch.manual_seed(0)
    if scalar_head:
        model = ScalarHeadModel.from_pretrained(tiny_model_path, torch.device("cpu"))
        model.seq_cls = add_lora(model.seq_cls, 4, 8.0, 0.0, ["q_proj", "v_proj"], scalar_head=True)
    else:
        model = add_lora(load_causal_lm(tiny_model_path, torch.device("cpu")), 4, 8.0, 0.0, ["q_proj", "v_proj"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 12))
    for _ in range(3):  # lora_B starts at 0: train a little so the adapters change the outputs
        out = model(ids, torch.ones_like(ids)) if scalar_head else model(input_ids=ids).logits
        optimizer.zero_grad()
        out.float().pow(2).mean().backward()
        optimizer.step()
    return model, ids


def test_only_adapters_train_and_disabling_them_gives_the_base_model_exactly(tiny_model_path):
    from rlhf_pipeline.models.loading import load_causal_lm
    from rlhf_pipeline.models.lora import adapters_disabled, is_lora

    model, ids = _trained_lora(tiny_model_path)
    assert is_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = load_causal_lm(tiny_model_path, torch.device("cpu"))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            reference = model(input_ids=ids).logits
    assert torch.equal(reference, expected)  # bitwise: PPO's reference is the SFT model
    assert float((adapted - expected).abs().max()) > 1e-3  # and the adapters did change the policy


def test_merged_weights_match_the_adapted_model_and_load_without_peft(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_pipeline.models.lora import is_lora, merged

    model, ids = _trained_lora(tiny_model_path)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    plain = merged(model)
    assert not is_lora(plain)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
        assert torch.equal(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_lora_reward_model_saves_its_trained_head_merged(tiny_model_path, tmp_path):
    from rlhf_pipeline.models.reward_model import ScalarHeadModel

    model, ids = _trained_lora(tiny_model_path, scalar_head=True)
    assert any(p.requires_grad for p in model.head.parameters())  # the head trains whole
    mask = torch.ones_like(ids)
    with torch.no_grad():
        scores = model.score(ids, mask)
    model.save_pretrained(tmp_path)
    reloaded = ScalarHeadModel.from_pretrained(tmp_path, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(reloaded.score(ids, mask), scores, atol=1e-5, rtol=0)


def test_lora_refuses_a_rank_below_one_and_unknown_modules(tiny_model_path):
    from rlhf_pipeline.models.loading import load_causal_lm
    from rlhf_pipeline.models.lora import add_lora

    model = load_causal_lm(tiny_model_path, torch.device("cpu"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(model, 0, 8.0, 0.0, ["q_proj"])
    with pytest.raises(ValueError, match="no module named c_attn"):
        add_lora(model, 4, 8.0, 0.0, ["c_attn"])
