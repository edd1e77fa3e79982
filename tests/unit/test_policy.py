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


def _favour(model, token_id: int):
    """A forward hook on the LM head that makes ``token_id`` by far the likeliest next token everywhere."""
    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += 100.0
        return output

    return model.lm_head.register_forward_hook(hook)


def test_the_first_sampled_token_may_end_the_response(tiny_model_path, tokenizer):
    """No minimum length: when EOS is (by far) the likeliest first token, it is sampled and the response is just EOS,
    with log-probability ~0, as the PPO ratio assumes (a sampler that forbids EOS at step 1 is off-policy)."""
    model = load_causal_lm(tiny_model_path, torch.device("cpu"))
    model.generation_config.min_new_tokens = 4  # a model's own config asking for a minimum length is ignored too
    handle = _favour(model, tokenizer.eos_token_id)
    try:
        torch.manual_seed(0)
        rollout = sample_responses(model, tokenizer, [chat_prompt_ids(tokenizer, MESSAGES)], 8, with_logprobs=True)
    finally:
        handle.remove()
    assert rollout.response_mask.sum().item() == 1 and bool(rollout.ended[0])
    assert rollout.responses[0, 0].item() == tokenizer.eos_token_id
    assert abs(rollout.logprobs[0, 0].item()) < 1e-4


def test_the_models_own_logits_processors_do_not_warp_rollouts(tiny_model_path, tokenizer):
    """A generation config with a repetition penalty and banned n-grams: greedy rollouts still follow the argmax of the
    raw logits (what the log-probabilities describe), and the model's config is restored after."""
    model = load_causal_lm(tiny_model_path, torch.device("cpu"))
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    queries = [chat_prompt_ids(tokenizer, MESSAGES), chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])]
    rollout = sample_responses(model, tokenizer, queries, 12, do_sample=False)
    assert model.generation_config.repetition_penalty == 5.0  # restored
    with torch.no_grad():
        out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask)
    argmax = out.logits[:, rollout.query_length - 1 : -1].argmax(-1)
    real = rollout.response_mask.bool()
    assert torch.equal(argmax[real], rollout.responses[real])
    # and a random tiny model repeats itself: the penalty, had it applied, would have changed these tokens
    assert any(len(set(r[m].tolist())) < int(m.sum()) for r, m in zip(rollout.responses, real))


def test_every_end_token_of_the_generation_config_ends_a_response(tiny_model_path, tokenizer):
    """A chat model whose turn ends with a token other than EOS: the rollout stops there, the mask ends there, the
    response counts as ended."""
    import copy

    from rlhf_pipeline.models.tokens import end_token_ids

    chat = copy.copy(tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_start|>")
    chat.end_token_ids = [tokenizer.eos_token_id, end_of_turn]
    assert end_token_ids(chat) == [tokenizer.eos_token_id, end_of_turn]
    model = load_causal_lm(tiny_model_path, torch.device("cpu"))
    handle = _favour(model, end_of_turn)
    try:
        rollout = sample_responses(model, chat, [chat_prompt_ids(chat, MESSAGES)], 8)
    finally:
        handle.remove()
    assert rollout.responses[0, 0].item() == end_of_turn and rollout.response_mask.sum().item() == 1
    assert bool(rollout.ended[0])


def test_load_tokenizer_reads_the_end_tokens_of_the_generation_config(tiny_model_path, tmp_path):
    import shutil

    from transformers import GenerationConfig

    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.models.tokens import closing_token_id, end_token_ids

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    GenerationConfig(eos_token_id=[2, 1]).save_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    assert end_token_ids(tokenizer) == [1, 2]
    assert closing_token_id(tokenizer) == 2  # the chat template closes an assistant turn with <|im_end|>
