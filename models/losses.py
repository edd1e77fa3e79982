"""The losses of the InstructGPT method, in one place.

- :func:`ranking_loss` — the reward model's pairwise / K-wise ranking loss (Ouyang et al. 2022, §3.5 "Reward modeling",
  App. C.2).
- :func:`per_token_kl_rewards` — the PPO reward: the RM score on the last response token minus beta times the per-token
  KL to the SFT (reference) model (§3.5 "Reinforcement learning", eq. 2; Ziegler et al. 2019).
- :func:`gae` — generalised advantage estimation (Schulman et al. 2016, eq. 16).
- :func:`ppo_policy_loss`, :func:`ppo_value_loss` — PPO's clipped surrogate and clipped value loss (Schulman et al. 2017,
  eq. 7 and 9; value clipping as in OpenAI's baselines and InstructGPT App. C.4).
- :func:`lm_loss` — the next-token loss of PPO-ptx (§3.5 eq. 2) and of perplexity.
- :func:`sft_loss` — supervised fine-tuning's next-token loss on the response tokens only (§3.5 "Supervised
  fine-tuning", App. C.1).

The KL coefficient's controllers are in :mod:`rlhf_pipeline.models.kl_controller`, the EMA of the policy's weights in
:mod:`rlhf_pipeline.models.ema`.

All tensors are float; masks are 0/1 of the same shape as the values they mask. Everything here is pure torch so tests can
check it against hand-computed values.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                total: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1.

    Args:
        values: any shape.
        mask: same shape as ``values``, 0/1.
        dim: reduce over this dimension only; ``None`` reduces over everything.
        total: divide the masked sum by this count instead of ``mask.sum()`` (with ``dim=None`` only): the global
            number of tokens when the batch is split over workers, so the workers' partial means add up to the mean
            of the whole batch.

    Raises:
        ValueError: when the shapes differ, or ``total`` is given with ``dim``.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.to(values.dtype)
    if total is not None:
        if dim is not None:
            raise ValueError("masked_mean: total is for a reduction over everything (dim=None)")
        return (values * mask).sum() / torch.as_tensor(total, dtype=values.dtype, device=values.device).clamp(min=1.0)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``values`` over the positions where ``mask`` is 1 (scalar)."""
    mean = masked_mean(values, mask)
    centered = (values - mean) ** 2
    n = mask.sum()
    var = masked_mean(centered, mask)
    if n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``values`` to unit variance (and zero mean if ``shift_mean``) over the masked positions.

    Used for advantage whitening (InstructGPT App. C.4 follows Stiennon et al. 2020). Returns the same shape; masked-out
    positions are set to 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def ranking_loss(rewards: torch.Tensor, num_responses: torch.Tensor | None = None) -> torch.Tensor:
    """The reward model's ranking loss over all C(K,2) pairs of each prompt.

    ``loss = -1/C(K,2) · Σ_{w ranked above l} log σ(r(x, y_w) − r(x, y_l))``, averaged over the prompts of the batch
    (InstructGPT §3.5, eq. 1; App. C.2). Each response is scored once and all its pairs share the score, which is why
    the paper puts all comparisons of one prompt into one batch element. With K = 2 this is the pairwise loss
    ``-log σ(r_chosen − r_rejected)``.

    Args:
        rewards: ``[B, K]`` scalar rewards, responses ranked best first along dim 1.
        num_responses: optional ``[B]`` ints, the real K of each row when rows are padded to a common K; padded columns
            are ignored.

    Returns:
        scalar loss (nats).

    Raises:
        ValueError: when ``rewards`` is not 2-D or K < 2.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [batch, K >= 2], got shape {tuple(rewards.shape)}")
    batch, k = rewards.shape
    if num_responses is None:
        num_responses = torch.full((batch,), k, device=rewards.device)
    pairs = list(itertools.combinations(range(k), 2))
    w_idx = torch.tensor([p[0] for p in pairs], device=rewards.device)
    l_idx = torch.tensor([p[1] for p in pairs], device=rewards.device)
    margins = rewards[:, w_idx] - rewards[:, l_idx]  # [B, C(K,2)]
    valid = (l_idx.unsqueeze(0) < num_responses.unsqueeze(1)).to(rewards.dtype)  # both in range since w < l
    per_prompt = -(F.logsigmoid(margins) * valid).sum(1) / valid.sum(1).clamp(min=1.0)
    return per_prompt.mean()


def ranking_accuracy(rewards: torch.Tensor, num_responses: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of ranked pairs ``(w, l)`` with ``r_w > r_l`` per row.

    Args:
        rewards: ``[B, K]`` scores, responses ranked best first.
        num_responses: optional ``[B]``, the real K of each row when rows are padded to a common K; pairs with a
            padded column are not counted (as in :func:`ranking_loss`).

    Returns:
        ``[B]`` accuracies in [0, 1].
    """
    k = rewards.shape[1]
    pairs = list(itertools.combinations(range(k), 2))
    correct = torch.stack([(rewards[:, w] > rewards[:, l]).float() for w, l in pairs], dim=1)
    if num_responses is None:
        return correct.mean(1)
    l_idx = torch.tensor([l for _, l in pairs], device=rewards.device)
    valid = (l_idx.unsqueeze(0) < num_responses.unsqueeze(1)).float()
    return (correct * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def per_token_kl_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of a rollout: ``-beta · (log π(a_t) − log π_ref(a_t))`` at every response token, plus the RM
    score at the last real response token (the EOS token, or the last token when the length limit cut the response).

    InstructGPT §3.5 eq. 2 (the KL term is applied per token as in Ziegler et al. 2019 and Stiennon et al. 2020).

    Args:
        scores: ``[B]`` reward-model scores of the full responses.
        logprobs: ``[B, T]`` log-probabilities of the sampled response tokens under the policy (at rollout time).
        ref_logprobs: ``[B, T]`` the same under the frozen reference (SFT) model.
        mask: ``[B, T]`` 1 for real response tokens (EOS included), 0 for padding after EOS.
        kl_coef: beta.

    Returns:
        ``(rewards [B, T], kl [B, T])`` where ``kl`` is the per-token estimate ``log π − log π_ref`` (masked).

    Raises:
        ValueError: when a row has no response token.
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(1).long()
    if (lengths == 0).any():
        raise ValueError("every response needs at least one token; got an empty response mask")
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = lengths - 1  # responses are right-padded: the last real token sits at length - 1
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each episode.

    ``δ_t = r_t + γ V(s_{t+1}) − V(s_t)``, ``A_t = Σ_l (γλ)^l δ_{t+l}``, with ``V = 0`` after the last real token
    (Schulman et al. 2016, eq. 16). InstructGPT uses no discount (γ = 1).

    Args:
        rewards: ``[B, T]`` per-token rewards.
        values: ``[B, T]`` value estimates of the state before each token.
        mask: ``[B, T]`` 1 for real tokens; responses are right-padded.

    Returns:
        ``(advantages [B, T], returns [B, T])``, both zero where ``mask`` is 0; ``returns = advantages + values``.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    batch, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae * (mask[:, t + 1] if t + 1 < steps else 0.0)
        last_gae = last_gae * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, negated as a loss.

    ``L = −E_t[min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)]`` with ``ρ_t = exp(log π_θ(a_t) − log π_old(a_t))``
    (Schulman et al. 2017, eq. 7), averaged over the real response tokens.

    Args:
        logprobs: ``[B, T]`` under the current policy (with grad).
        old_logprobs: ``[B, T]`` at rollout time.
        advantages: ``[B, T]``.
        mask: ``[B, T]``.
        num_tokens: the token count the loss and the statistics are divided by (default ``mask.sum()``; the global
            count of the minibatch when it is split over workers: see :func:`masked_mean`).

    Returns:
        ``(loss, stats)`` with stats ``clipfrac`` (fraction of tokens where the clip is active), ``approx_kl``
        (``E[(ρ−1) − log ρ]``, Schulman's k3 estimator between the old and current policy) and ``ratio`` (mean).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask, total=num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask, total=num_tokens),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask, total=num_tokens),
            "ratio": masked_mean(ratio, mask, total=num_tokens),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``½ E_t[max((V − R)², (clip(V, V_old ± ε_v) − R)²)]``.

    Value clipping as in OpenAI baselines' PPO2 (used for InstructGPT's value function, App. C.4).

    Args:
        values: ``[B, T]`` current value predictions (with grad).
        old_values: ``[B, T]`` at rollout time.
        returns: ``[B, T]`` GAE returns (targets).
        mask: ``[B, T]``.
        num_tokens: the divisor of the masked sums, as in :func:`ppo_policy_loss`.

    Returns:
        ``(loss, stats)`` with ``vf_clipfrac``.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask, total=num_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask, total=num_tokens)}
    return loss, stats


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token negative log-likelihood over real tokens (nats/token): the PPO-ptx term
    ``−E_pretrain[log π(x)]`` (InstructGPT §3.5, eq. 2) and perplexity's log.

    Args:
        logits: ``[B, T, V]``.
        input_ids, attention_mask: ``[B, T]``.
        num_tokens: the divisor of the summed NLL (default: the real predicted tokens, ``attention_mask[:, 1:].sum()``).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return masked_mean(nll, attention_mask[:, 1:].to(nll.dtype), total=num_tokens)


#: the label of a position that carries no loss (prompt and padding tokens), as in transformers
IGNORE_INDEX = -100


def sft_loss(logits: torch.Tensor, labels: torch.Tensor,
             num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token negative log-likelihood of the labelled tokens divided by ``num_tokens`` (nats/token): the
    SFT objective on demonstrations, where only the response tokens (closed by EOS) are labelled and the prompt and
    padding carry :data:`IGNORE_INDEX` (InstructGPT §3.5 "Supervised fine-tuning", App. C.1).

    Args:
        logits: ``[B, T, V]`` (any float dtype; the loss is computed in fp32).
        labels: ``[B, T]`` token ids aligned with the inputs (position ``t`` is predicted by the logits at ``t − 1``),
            :data:`IGNORE_INDEX` where there is no loss.
        num_tokens: the divisor (default: the labelled tokens ``(labels[:, 1:] != IGNORE_INDEX).sum()``); the global
            count of a batch split over workers, so the workers' partial losses add up to the whole batch's mean;
            ``1`` for the plain sum.
    """
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    if num_tokens is None:
        num_tokens = (target != IGNORE_INDEX).sum().clamp(min=1)
    return nll / num_tokens
