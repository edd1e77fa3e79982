"""Tokens and batching (models/tokens.py): last-token index under both paddings, the chat template."""

from __future__ import annotations

import torch

from rlhf_pipeline.models.tokens import chat_prompt_ids, last_token_index

MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_chat_template_has_no_double_bos(tokenizer):
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start
    assert ids[-4:] == tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids(tokenizer, MESSAGES, max_tokens=5) == ids[-5:]
