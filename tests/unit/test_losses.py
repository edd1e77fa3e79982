"""The losses of the method (models/losses.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_pipeline.models.losses import (
    gae,
    masked_mean,
    masked_whiten,
    per_token_kl_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_accuracy,
    ranking_loss,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pairwise_ranking_loss_by_hand():
    # -log sigmoid(1 - 0) = log(1 + e^-1)
    loss = ranking_loss(torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    # a wrongly ordered pair costs more: -log sigmoid(-2) = log(1 + e^2)
    assert ranking_loss(torch.tensor([[0.0, 2.0]])).item() == pytest.approx(softplus(2.0), abs=1e-6)
    # the batch mean
    both = ranking_loss(torch.tensor([[1.0, 0.0], [0.0, 2.0]])).item()
    assert both == pytest.approx((softplus(-1.0) + softplus(2.0)) / 2, abs=1e-6)


def test_kwise_ranking_loss_by_hand_k3_k4():
    # K = 3, rewards best first 2, 1, 0: pairs (2-1), (2-0), (1-0)
    k3 = ranking_loss(torch.tensor([[2.0, 1.0, 0.0]])).item()
    assert k3 == pytest.approx((softplus(-1) + softplus(-2) + softplus(-1)) / 3, abs=1e-6)
    assert k3 == pytest.approx(0.2511508, abs=1e-6)
    # K = 4 with one inversion: rewards 0, 1, -1, -2 (response 2 scored above response 1)
    r = [0.0, 1.0, -1.0, -2.0]
    pairs = [(w, l) for w in range(4) for l in range(w + 1, 4)]
    expected = sum(softplus(-(r[w] - r[l])) for w, l in pairs) / 6
    assert ranking_loss(torch.tensor([r])).item() == pytest.approx(expected, abs=1e-6)
    assert ranking_accuracy(torch.tensor([r])).item() == pytest.approx(5 / 6)


def test_kwise_padding_ignores_missing_responses():
    # a K=2 row padded to K=3 gives the pairwise loss of its two real responses
    padded = ranking_loss(torch.tensor([[1.0, 0.0, 99.0]]), num_responses=torch.tensor([2]))
    assert padded.item() == pytest.approx(softplus(-1.0), abs=1e-6)


def test_ranking_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="K >= 2"):
        ranking_loss(torch.tensor([[1.0]]))


def test_gae_hand_example_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 1.0, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # row 0: d2 = 1 - 0.7 = 0.3; d1 = 0.7 - 0.6 = 0.1; d0 = 0.6 - 0.5 = 0.1
    assert adv[0].tolist() == pytest.approx([0.1 + 0.9 * (0.1 + 0.9 * 0.3), 0.1 + 0.9 * 0.3, 0.3], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.933, 0.97, 1.0], abs=1e-6)
    # row 1: the padded token (reward 5, value 9.9) is ignored; d1 = 2 - 1 = 1; d0 = 1 - 0.5 = 0.5
    assert adv[1].tolist() == pytest.approx([0.5 + 0.9 * 1.0, 1.0, 0.0], abs=1e-6)


def test_gae_discount():
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 1.0])


def test_kl_rewards_put_the_score_on_the_eos_token():
    scores = torch.tensor([1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.7, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])  # [t0, t1, EOS, PAD, PAD]
    rewards, kl = per_token_kl_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert kl[0].tolist() == pytest.approx([0.5, 0.0, 0.2, 0.0, 0.0], abs=1e-6)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, 1.0 - 0.02, 0.0, 0.0], abs=1e-6)


def test_kl_rewards_reject_empty_response():
    with pytest.raises(ValueError, match="at least one token"):
        per_token_kl_rewards(torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)


def test_ppo_policy_loss_by_hand():
    # token 0: ratio 2, A = 1 -> clipped to 1.2: loss -1.2, clip active
    # token 1: ratio 0.5, A = 1 -> min(0.5, 0.8) = 0.5: loss -0.5, clip inactive
    # token 2: ratio 2, A = -1 -> min(-2, -1.2) = -2: loss 2, clip inactive
    old = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    new = torch.log(torch.tensor([[0.5, 0.25, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = ppo_policy_loss(new, old, adv, torch.ones(1, 3), clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    # equal policies: ratio 1, approx KL 0, loss = -mean(A)
    same, stats = ppo_policy_loss(old, old, adv, torch.ones(1, 3))
    assert same.item() == pytest.approx(-1 / 3, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.5, 1.1]])
    old = torch.tensor([[1.0, 1.0]])
    returns = torch.tensor([[2.0, 2.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 0: clipped value 1.2 -> (0.8)^2 = 0.64 > (0.5)^2; token 1: inside the clip, (0.9)^2 = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_masked_helpers():
    values = torch.tensor([[1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(1.5)
    whitened = masked_whiten(values, mask)
    assert whitened[0, 2].item() == 0.0
    assert whitened[0, :2].sum().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        masked_mean(values, torch.ones(2, 3))


def test_lm_loss_by_hand():
    from rlhf_pipeline.models.losses import lm_loss

    # vocab 2; logits uniform at position 0, certain at position 1; the last position predicts nothing
    logits = torch.tensor([[[0.0, 0.0], [0.0, 100.0], [5.0, 5.0]]])
    ids = torch.tensor([[0, 1, 1]])
    assert lm_loss(logits, ids, torch.ones(1, 3)).item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    # padding after the second token: only the first prediction counts
    assert lm_loss(logits, ids, torch.tensor([[1, 1, 0]])).item() == pytest.approx(math.log(2), abs=1e-6)


def test_ranking_accuracy_ignores_padded_responses():
    """K varies in a batch (3 and 2): the second row is padded with a copy of its last response (as the RM stage
    batches them), which must take part in no pair: its one real pair is right, so its accuracy is 1, not 2/3."""
    from rlhf_pipeline.models.losses import ranking_accuracy

    rewards = torch.tensor([[3.0, 2.0, 1.0], [2.0, 1.0, 1.0]])
    assert ranking_accuracy(rewards, torch.tensor([3, 2])).tolist() == [1.0, 1.0]
    assert ranking_accuracy(rewards).tolist() == pytest.approx([1.0, 2 / 3])  # counting the padded column


def test_sft_loss_counts_labelled_tokens_only():
    """Uniform logits over 4 tokens: every labelled token costs log 4; IGNORE_INDEX positions (the prompt) cost
    nothing; ``num_tokens`` divides the sum (a global count when the batch is split over workers)."""
    from rlhf_pipeline.models.losses import IGNORE_INDEX, sft_loss

    logits = torch.zeros(1, 4, 4, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 2]])  # position 0 is never predicted; 2 labelled tokens
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(4), abs=1e-6)
    assert sft_loss(logits, labels, num_tokens=1).item() == pytest.approx(2 * math.log(4), abs=1e-6)
    sft_loss(logits, labels).backward()
    assert logits.grad[0, :1].abs().sum() == 0  # predicting a prompt token gets no gradient
    assert logits.grad[0, 3].abs().sum() == 0  # nor does the last position (it predicts nothing)
    # position 1 predicts token 1: softmax − one-hot, over the 2 labelled tokens
    assert logits.grad[0, 1].tolist() == pytest.approx([0.125, (0.25 - 1) / 2, 0.125, 0.125])
