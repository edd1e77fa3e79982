"""PPO (tasks/ppo.py) on the tiny model: step-one invariants, the KL penalty, the missing-EOS penalty, PPO-ptx, minibatch
trimming and the optimizer."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.models.loading import load_causal_lm
from rlhf_pipeline.models.losses import ppo_policy_loss, ppo_value_loss
from rlhf_pipeline.models.policy import response_logprobs, sample_responses
from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import chat_prompt_ids
from rlhf_pipeline.tasks.ppo import PPOConfig

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


def test_ppo_step_zero_policy_equals_reference(tiny_model_path, tokenizer):
    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    reference = load_causal_lm(tiny_model_path, CPU).eval()
    queries = [chat_prompt_ids(tokenizer, MESSAGES), chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])]
    rollout = sample_responses(policy, tokenizer, queries, max_new_tokens=6)
    args = (rollout.input_ids, rollout.attention_mask, rollout.query_length)
    with torch.no_grad():
        lp, _ = response_logprobs(policy, *args)
        ref, _ = response_logprobs(reference, *args)
    mask = rollout.response_mask.float()
    kl = ((lp - ref) * mask).sum(1)
    assert kl.abs().max().item() == 0.0
    _, stats = ppo_policy_loss(lp, ref, torch.ones_like(lp), mask)
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-7)
    # the response is right-padded after the first EOS and the mask covers it
    assert rollout.response_mask.shape == rollout.responses.shape
    assert (rollout.responses[rollout.response_mask == 0] == tokenizer.pad_token_id).all()


def test_sampled_kl_to_reference_is_non_negative(tiny_model_path, tokenizer):
    """With temperature 1 and no top-k/top-p, the mean sampled KL(policy || reference) estimate is >= 0."""
    torch.manual_seed(0)
    reference = load_causal_lm(tiny_model_path, CPU).eval()
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    queries = [chat_prompt_ids(tokenizer, MESSAGES)] * 32
    rollout = sample_responses(policy, tokenizer, queries, max_new_tokens=8, temperature=1.0)
    args = (rollout.input_ids, rollout.attention_mask, rollout.query_length)
    with torch.no_grad():
        lp, _ = response_logprobs(policy, *args)
        ref, _ = response_logprobs(reference, *args)
    kl = ((lp - ref) * rollout.response_mask).sum(1)
    assert kl.mean().item() > 0.0


def test_missing_eos_penalty_replaces_the_score(tiny_model_path, tokenizer):
    from rlhf_pipeline.tasks.ppo import score_rollout

    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    value = ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()
    queries = [chat_prompt_ids(tokenizer, MESSAGES)] * 2
    rollout = sample_responses(policy, tokenizer, queries, max_new_tokens=3)
    assert not rollout.ended.any()  # a random tiny model does not say EOS within 3 tokens
    cfg = PPOConfig(missing_eos_penalty=-5.0, kl_coef=0.0)
    batch = score_rollout(rollout, policy, policy, value, value, cfg)
    assert batch["rewards"][:, -1].tolist() == pytest.approx([-5.0, -5.0])
    assert batch["kl"].abs().max().item() == 0.0


def test_ppo_ptx_adds_the_pretraining_lm_loss(tiny_model_path, tokenizer):
    """PPO-ptx: each minibatch update also descends gamma * LM loss on a pretraining batch (InstructGPT eq. 2)."""
    from rlhf_pipeline.models.losses import gae, lm_loss
    from rlhf_pipeline.tasks.ppo import ppo_update, pretraining_batches, score_rollout

    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    value = ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()
    texts = ["Human: hello there\n\nAssistant: hi, how can I help?"] * 4
    batches = pretraining_batches(texts, tokenizer, 2, 32, torch.Generator().manual_seed(0), CPU)
    ptx_ids, ptx_mask = next(pretraining_batches(texts, tokenizer, 2, 32, torch.Generator().manual_seed(0), CPU))
    with torch.no_grad():
        before = lm_loss(policy(input_ids=ptx_ids, attention_mask=ptx_mask).logits, ptx_ids, ptx_mask).item()
    rollout = sample_responses(policy, tokenizer, [chat_prompt_ids(tokenizer, MESSAGES)] * 2, max_new_tokens=4)
    cfg = PPOConfig(ptx_coef=1.0, mini_batch_size=2, learning_rate=1e-3)
    batch = score_rollout(rollout, policy, policy, value, value, cfg)
    adv, ret = gae(batch["rewards"], batch["values"], batch["mask"])
    opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    vopt = torch.optim.SGD(value.parameters(), lr=0.0)
    stats = ppo_update(rollout, batch, torch.zeros_like(adv), ret, policy, value, opt, vopt, cfg,
                       torch.Generator().manual_seed(0), batches)
    assert stats["ptx_loss"] == pytest.approx(before, rel=1e-4)  # measured before the step
    with torch.no_grad():
        after = lm_loss(policy(input_ids=ptx_ids, attention_mask=ptx_mask).logits, ptx_ids, ptx_mask).item()
    assert after < before  # with zero advantages only the PTX term moves the policy: towards the text


def test_step_one_invariants_with_generate_logprobs(tiny_model_path, tokenizer, queries):
    """Policy == reference at step 1: KL to the reference ~0 and the first update's ratio ~1, to the rounding of the
    cached vs full-sequence pass (exactly 0 and 1 with the forward-pass path, tests/unit/test_models.py)."""
    from rlhf_pipeline.tasks.ppo import score_rollout

    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    reference = load_causal_lm(tiny_model_path, CPU).eval()
    value = ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()
    rollout = sample_responses(policy, tokenizer, queries, 8, with_logprobs=True)
    batch = score_rollout(rollout, policy, reference, value, value, PPOConfig())
    assert batch["kl"].abs().max().item() < TOL
    assert batch["kl"].sum(1).abs().max().item() < 8 * TOL
    with torch.no_grad():
        new, _ = response_logprobs(policy, rollout.input_ids, rollout.attention_mask, rollout.query_length)
    _, stats = ppo_policy_loss(new, batch["logprobs"], torch.ones_like(new), batch["mask"])
    assert stats["ratio"].item() == pytest.approx(1.0, abs=TOL)
    assert stats["clipfrac"].item() == 0.0


def test_trimmed_minibatch_gives_the_same_losses_and_gradients(tiny_model_path, tokenizer, queries):
    from rlhf_pipeline.models.losses import gae
    from rlhf_pipeline.tasks.ppo import score_rollout, trim_padding

    torch.manual_seed(1)
    policy = load_causal_lm(tiny_model_path, CPU).eval()
    value = ScalarHeadModel.from_pretrained(tiny_model_path, CPU).eval()
    rollout = sample_responses(policy, tokenizer, queries, 6)
    # force response padding: pretend the first two episodes ended after 2 tokens
    mask = rollout.response_mask.clone()
    mask[:2, 2:] = 0
    rollout.response_mask = mask
    rollout.attention_mask[:2, rollout.query_length + 2:] = 0
    batch = score_rollout(rollout, policy, policy, value, value, PPOConfig())
    adv, ret = gae(batch["rewards"], batch["values"], batch["mask"])
    idx = torch.tensor([0, 1])  # the two short prompts and short responses: both sides trim
    ids, attn, p, r = trim_padding(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.query_length,
                                   rollout.response_mask[idx])
    assert p < rollout.query_length and r == 2
    assert attn[:, 0].any() and attn[:, p:].any(0).all()

    def losses_and_grads(ids, attn, p, r):
        policy.zero_grad()
        value.zero_grad()
        m = batch["mask"][idx, :r]
        lp, _ = response_logprobs(policy, ids, attn, p)
        pg, _ = ppo_policy_loss(lp, batch["logprobs"][idx, :r] + 0.1, adv[idx, :r], m)
        vf, _ = ppo_value_loss(value.values(ids, attn)[:, p - 1 : -1], batch["values"][idx, :r], ret[idx, :r], m)
        (pg + vf).backward()
        grads = [q.grad.clone() for q in list(policy.parameters()) + list(value.parameters()) if q.grad is not None]
        return pg.item(), vf.item(), grads

    full = losses_and_grads(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.query_length,
                            rollout.response_mask.shape[1])
    trimmed = losses_and_grads(ids, attn, p, r)
    assert trimmed[0] == pytest.approx(full[0], abs=1e-5)
    assert trimmed[1] == pytest.approx(full[1], abs=1e-5)
    assert len(trimmed[2]) == len(full[2])
    assert max((a - b).abs().max().item() for a, b in zip(trimmed[2], full[2])) < 1e-5


def test_trim_padding_keeps_a_batch_without_padding_whole():
    from rlhf_pipeline.tasks.ppo import trim_padding

    ids = torch.arange(12).reshape(2, 6)
    attn = torch.ones(2, 6, dtype=torch.long)
    out_ids, out_attn, p, r = trim_padding(ids, attn, 4, torch.ones(2, 2, dtype=torch.long))
    assert torch.equal(out_ids, ids) and torch.equal(out_attn, attn) and (p, r) == (4, 2)
    attn[:, 0] = 0  # a column of padding in front of both queries
    out_ids, _, p, r = trim_padding(ids, attn, 4, torch.tensor([[1, 0], [1, 0]]))
    assert torch.equal(out_ids, ids[:, 1:5]) and (p, r) == (3, 1)


def test_fused_adamw_follows_the_plain_update_rule():
    from rlhf_pipeline.tasks.ppo import adamw

    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused, plain = adamw(a.parameters(), 1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.0)
    assert fused.defaults["fused"]
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


@pytest.mark.timeout(60)
def test_ptx_batches_wrap_around_when_there_are_fewer_texts_than_a_batch(tokenizer):
    """Two texts and batches of 5: the stream keeps coming (it used to loop forever looking for a full batch)."""
    from rlhf_pipeline.tasks.ppo import pretraining_batches

    batches = pretraining_batches(["Human: hi\n\nAssistant: hello", "Human: bye\n\nAssistant: see you"], tokenizer, 5,
                                  16, torch.Generator().manual_seed(0), torch.device("cpu"))
    first, second = next(batches), next(batches)
    assert first[0].shape[0] == second[0].shape[0] == 5
    with pytest.raises(ValueError, match="no pretraining texts"):
        next(pretraining_batches([], tokenizer, 2, 16, torch.Generator(), torch.device("cpu")))


def test_top_k_and_top_p_are_refused_where_log_probabilities_ignore_them():
    from pydantic import ValidationError

    from rlhf_pipeline.tasks.evaluate import EvaluateConfig

    for bad in ({"top_k": 40}, {"top_p": 0.9}):
        with pytest.raises(ValidationError, match="must stay off"):
            PPOConfig(**bad)
    with pytest.raises(ValidationError, match="evaluate.top_p must stay 1.0"):
        EvaluateConfig(top_p=0.9)
