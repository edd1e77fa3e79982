"""The reward model (models/reward_model.py): the score is read at the last real token, under any padding; save and load
keep the head and the bias."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import chat_prompt_ids, encode_pair, pad_sequences

CPU = torch.device("cpu")


MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def reward_model(tiny_model_path):
    torch.manual_seed(0)
    return ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()


def test_reward_differs_when_only_the_last_token_differs(reward_model, tokenizer):
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    a = prompt + tokenizer("Mix flour", add_special_tokens=False)["input_ids"]
    b = a[:-1] + [tokenizer.eos_token_id]  # pad == EOS: the EOS must still be read
    ids, mask = pad_sequences([a, b], tokenizer.pad_token_id, side="right")
    with torch.no_grad():
        scores = reward_model.score(ids, mask)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert scores[0].item() != pytest.approx(scores[1].item(), abs=1e-6)


def test_reward_same_under_left_and_right_padding(reward_model, tokenizer):
    short = encode_pair(tokenizer, MESSAGES, "Knead it.", 128)
    long = encode_pair(tokenizer, MESSAGES, "Mix flour, water, salt and yeast, then knead for ten minutes.", 128)
    with torch.no_grad():
        right = reward_model.score(*pad_sequences([short, long], tokenizer.pad_token_id, "right"))
        left = reward_model.score(*pad_sequences([short, long], tokenizer.pad_token_id, "left"))
        alone = reward_model.score(*pad_sequences([short], tokenizer.pad_token_id, "right"))
    assert right.tolist() == pytest.approx(left.tolist(), abs=1e-4)
    assert right[0].item() == pytest.approx(alone[0].item(), abs=1e-4)


def test_reward_model_round_trip_keeps_head_and_bias(reward_model, tokenizer, tmp_path):
    ids, mask = pad_sequences([encode_pair(tokenizer, MESSAGES, "Knead it.", 64)], tokenizer.pad_token_id)
    reward_model.bias.fill_(0.75)
    with torch.no_grad():
        before = reward_model.score(ids, mask).item()
    reward_model.save_pretrained(tmp_path)
    reward_model.bias.fill_(0.0)
    loaded = ScalarHeadModel.from_pretrained(tmp_path, CPU).eval()
    with torch.no_grad():
        assert loaded.score(ids, mask).item() == pytest.approx(before, abs=1e-5)
    assert float(loaded.bias) == pytest.approx(0.75)
