"""The policy's rollouts (models/policy.py): sampled log-probabilities equal the generation distribution and a full forward."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.models.loading import load_causal_lm
from rlhf_pipeline.models.policy import response_logprobs, sample_responses
from rlhf_pipeline.models.tokens import chat_prompt_ids

CPU = torch.device("cpu")


MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


PROMPTS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Name three rivers in Europe and say which is the longest, please."}],
]


TOL = 1e-4


@pytest.fixture(scope="module")
def queries(tokenizer):
    return [chat_prompt_ids(tokenizer, p) for p in PROMPTS]


def test_sampled_logprobs_match_generation_distribution(tiny_model_path, tokenizer):
    """Log-probabilities recomputed by a full forward equal those of the cached generation."""
    model = load_causal_lm(tiny_model_path, CPU).eval()
    queries = [chat_prompt_ids(tokenizer, MESSAGES)]
    torch.manual_seed(1)
    rollout = sample_responses(model, tokenizer, queries, max_new_tokens=4)
    with torch.no_grad():
        lp, entropy = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.query_length,
                                        with_entropy=True)
        out = model(rollout.input_ids)
    logp = torch.log_softmax(out.logits[0, rollout.query_length - 1 : -1], -1)
    expected = logp.gather(-1, rollout.responses[0].unsqueeze(-1)).squeeze(-1)
    assert lp[0].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert (entropy > 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_logprobs_equal_a_full_forward(tiny_model_path, tokenizer, queries, temperature):
    model = load_causal_lm(tiny_model_path, CPU).eval()
    torch.manual_seed(3)
    rollout = sample_responses(model, tokenizer, queries, 8, temperature=temperature, with_logprobs=True)
    torch.manual_seed(3)
    plain = sample_responses(model, tokenizer, queries, 8, temperature=temperature)
    assert torch.equal(rollout.input_ids, plain.input_ids)  # asking for the logits does not change the samples
    assert plain.logprobs is None
    with torch.no_grad():
        full, _ = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.query_length, temperature)
    mask = rollout.response_mask.bool()
    assert rollout.logprobs.shape == full.shape and rollout.logprobs.dtype == torch.float32
    assert (rollout.logprobs[mask] - full[mask]).abs().max().item() < TOL
