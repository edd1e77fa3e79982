"""The PPO step's shortcuts (benchmarks/README.md) compute what the plain path computes, on the tiny model:
old log-probabilities read from generate's logits, minibatches trimmed of all-padding columns, fused AdamW."""

import pytest
import torch

from flows.config import PPOConfig
from models.loading import load_causal_lm
from models.losses import ppo_policy_loss, ppo_value_loss
from models.policy import response_logprobs, sample_responses
from models.reward_model import ScalarHeadModel, chat_prompt_ids

CPU = torch.device("cpu")
PROMPTS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Name three rivers in Europe and say which is the longest, please."}],
]

# generate's cached incremental pass vs one full-sequence pass, fp32: measured <= 2e-6 nats a token on the tiny model
# and <= 2e-5 on SmolLM2-135M (mean 2.5e-6); 1e-4 leaves room for other CPUs' kernels
TOL = 1e-4


@pytest.fixture(scope="module")
def queries(tokenizer):
    return [chat_prompt_ids(tokenizer, p) for p in PROMPTS]


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


def test_step_one_invariants_with_generate_logprobs(tiny_model_path, tokenizer, queries):
    """Policy == reference at step 1: KL to the reference ~0 and the first update's ratio ~1, to the rounding of the
    cached vs full-sequence pass (exactly 0 and 1 with the forward-pass path, tests/unit/test_models.py)."""
    from tasks.ppo import score_rollout

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
    from models.losses import gae
    from tasks.ppo import score_rollout, trim_padding

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
    from tasks.ppo import trim_padding

    ids = torch.arange(12).reshape(2, 6)
    attn = torch.ones(2, 6, dtype=torch.long)
    out_ids, out_attn, p, r = trim_padding(ids, attn, 4, torch.ones(2, 2, dtype=torch.long))
    assert torch.equal(out_ids, ids) and torch.equal(out_attn, attn) and (p, r) == (4, 2)
    attn[:, 0] = 0  # a column of padding in front of both queries
    out_ids, _, p, r = trim_padding(ids, attn, 4, torch.tensor([[1, 0], [1, 0]]))
    assert torch.equal(out_ids, ids[:, 1:5]) and (p, r) == (3, 1)


def test_fused_adamw_follows_the_plain_update_rule():
    from tasks.ppo import adamw

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
