"""Tokens and batching: chat prompts, responses closed with EOS, padding, positions, and chunking of lists.

Shared by the policy (rollouts), the reward and value models (scores) and the stages that batch texts; nothing here
holds a model.
"""

from __future__ import annotations

import torch


def chat_prompt_ids(tokenizer, messages: list[dict], max_tokens: int | None = None) -> list[int]:
    """Token ids of a chat prompt with the generation prompt (``<|im_start|>assistant\\n``) appended.

    The template already starts with the BOS-like ``<|im_start|>``; no extra BOS is added. When the prompt is longer than
    ``max_tokens`` its oldest tokens are dropped (left truncation keeps the latest turns).
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[-max_tokens:]
    return ids


def end_token_ids(tokenizer) -> list[int]:
    """The token ids that end a response: the model's EOS ids (every one of its generation config's, set by
    :func:`rlhf_pipeline.models.loading.load_tokenizer`), else the tokenizer's EOS. Rollouts stop at any of them,
    response masks end at the first, and the reward is read there."""
    return list(getattr(tokenizer, "end_token_ids", None) or [tokenizer.eos_token_id])


def closing_token_id(tokenizer) -> int:
    """The end token a written response is closed with (demonstrations for SFT, responses the RM scores): the one the
    chat template puts after an assistant turn when it is an end token, else the tokenizer's EOS. Training closes
    responses with the token the model's own samples end with."""
    cached = getattr(tokenizer, "_rlhf_closing_token_id", None)
    if cached is not None:
        return cached
    ends, closing = set(end_token_ids(tokenizer)), tokenizer.eos_token_id
    try:
        marker = "\u2063"  # a character no template adds
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}],
                                            tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        after = tokenizer(marker, add_special_tokens=False)["input_ids"][-1]
        tail = ids[len(ids) - 1 - ids[::-1].index(after) + 1 :] if after in ids else []
        closing = next((i for i in tail if i in ends), closing)
    except (ValueError, TypeError, KeyError, AttributeError):  # no chat template: the tokenizer's EOS
        pass
    tokenizer._rlhf_closing_token_id = closing
    return closing


def response_ids(tokenizer, response: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of a response text closed with its end token (:func:`closing_token_id`); a response cut to
    ``max_tokens`` keeps its end token."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: max_tokens - 1]
    return list(ids) + [closing_token_id(tokenizer)]


def encode_pair(tokenizer, messages: list[dict], response: str, max_length: int, split: bool = False):
    """Prompt + response ids within ``max_length``: the response keeps up to half the budget, the prompt (cut from the
    left) the rest. With ``split`` the two id lists are returned apart, ``(prompt, response)``."""
    resp = response_ids(tokenizer, response, max_tokens=max(2, max_length // 2))
    prompt = chat_prompt_ids(tokenizer, messages, max_tokens=max_length - len(resp))
    return (prompt, resp) if split else prompt + resp


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to ``[B, T]`` ``input_ids`` and ``attention_mask`` (1 = real token), on the ``left`` or ``right``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def pad_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``(prompt ids, response ids)`` pairs (:func:`encode_pair` with ``split``) to ``[B, T]``
    ``input_ids``, ``attention_mask`` and ``response_mask`` (1 on the response's tokens: what a mean-pooled reward model
    averages over)."""
    ids, mask = pad_sequences([prompt + response for prompt, response in pairs], pad_id, side="right")
    response_mask = mask.clone()
    for row, (prompt, _) in enumerate(pairs):
        response_mask[row, : len(prompt)] = 0
    return ids, mask, response_mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last position whose mask is 1 (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (needed under left padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def batched(items: list, size: int) -> list[list]:
    """Consecutive chunks of ``items`` of at most ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
