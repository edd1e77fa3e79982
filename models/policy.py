"""The policy's side of a rollout: sampling responses and reading their per-token log-probabilities.

A rollout batch is laid out as ``[query (left-padded) | response (right-padded)]``: every query ends at the same
column ``P`` and every response starts there, so response token ``t`` is predicted by the logits at column ``P + t - 1``
and the value of the state before it is read at the same column.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from rlhf_pipeline.models.tokens import end_token_ids, pad_sequences, position_ids_from_mask


@dataclass
class Rollout:
    """A batch of sampled episodes.

    Attributes:
        input_ids: ``[B, P + R]`` query then response ids.
        attention_mask: ``[B, P + R]`` 1 on real tokens.
        query_length: ``P``, the padded query width.
        response_mask: ``[B, R]`` 1 on response tokens up to and including the first EOS.
        ended: ``[B]`` bool, whether the response ended with EOS (False: cut by the length limit).
        logprobs: ``[B, R]`` float32 log-probabilities of the sampled tokens under the sampling model, read from
            ``generate``'s raw logits (``sample_responses(..., with_logprobs=True)``), else ``None``. The same quantity
            as :func:`response_logprobs` on this rollout up to float rounding (cached vs full-sequence attention).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    query_length: int
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None

    @property
    def sequence_response_mask(self) -> torch.Tensor:
        """``[B, P + R]``: ``response_mask`` at the width of ``input_ids`` (0 on the query), what a reward model with
        mean pooling averages over."""
        return torch.nn.functional.pad(self.response_mask, (self.query_length, 0))

    @property
    def responses(self) -> torch.Tensor:
        """``[B, R]`` response ids (pad after EOS)."""
        return self.input_ids[:, self.query_length :]


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    query_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    with_logprobs: bool = False,
) -> Rollout:
    """Sample one response per query with ``model.generate``; everything after a response's first end token (any of
    :func:`rlhf_pipeline.models.tokens.end_token_ids`) is padding.

    The tokens are drawn from the distribution the log-probabilities describe: ``softmax(logits / temperature)``, with
    no minimum length (the first token may end the response) and none of the model's own logits processors
    (:func:`neutral_generation_config`). PPO refuses top-k / top-p (the log-probabilities would not describe them);
    greedy decoding (``do_sample=False``) is for checkpoint selection and serving.

    Args:
        query_ids: token ids of each chat prompt (already templated, generation prompt included).
        max_new_tokens: response length limit R.
        temperature, top_k, top_p: sampling settings (top_k 0 and top_p 1 disable them).
        with_logprobs: also fill ``Rollout.logprobs`` from the logits ``generate`` computes anyway
            (``output_logits=True``: the *raw* logits, before any logits processor), so PPO needs no separate policy
            forward for its old log-probabilities. They are ``log_softmax(logits / temperature)`` at the sampled
            token, exactly what :func:`response_logprobs` computes (which ignores top-k / top-p too), evaluated with
            the KV cache instead of a full-sequence pass: equal up to float rounding (fp32: ≤ 2e-5 nats a token on
            SmolLM2-135M, mean 2.5e-6).
            Costs ``B · R · V`` float32 of memory while generating.

    Returns:
        a :class:`Rollout`.
    """
    device = next(model.parameters()).device
    queries, query_mask = pad_sequences(query_ids, tokenizer.pad_token_id, side="left")
    queries, query_mask = queries.to(device), query_mask.to(device)
    ends = end_token_ids(tokenizer)
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if with_logprobs:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    with neutral_generation_config(model, ends, tokenizer.pad_token_id):
        out = model.generate(input_ids=queries, attention_mask=query_mask, **kwargs)
    sequences = out.sequences if with_logprobs else out
    responses = sequences[:, queries.shape[1] :]
    logprobs = None
    if with_logprobs:
        # one [B, V] raw-logit tensor per generated token; gathered step by step (no [B, R, V] copy)
        logprobs = torch.stack(
            [_token_logprobs(step_logits, responses[:, t], temperature) for t, step_logits in enumerate(out.logits)], 1
        )
        del out
    is_eos = torch.isin(responses, torch.tensor(ends, device=responses.device))
    # 1 up to and including the first end token
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_first_eos).long()
    responses = responses.masked_fill(after_first_eos, tokenizer.pad_token_id)
    ended = is_eos.any(1)
    return Rollout(
        input_ids=torch.cat([queries, responses], 1),
        attention_mask=torch.cat([query_mask, response_mask], 1),
        query_length=queries.shape[1],
        response_mask=response_mask,
        ended=ended,
        logprobs=logprobs,
    )


@contextlib.contextmanager
def neutral_generation_config(model, end_ids: list[int], pad_id: int) -> Iterator[None]:
    """Sample from the model's own distribution inside the block: the model's generation config (which may set a
    repetition penalty, banned n-grams, a minimum length, top-k 50...) is replaced by a fresh one that only knows the
    end and pad tokens, so the tokens are drawn from ``softmax(logits / temperature)`` (with the top-k / top-p given
    to ``generate``) and the log-probabilities PPO uses for its ratio and KL are those of the distribution that
    sampled. The model's config is restored after."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = GenerationConfig(eos_token_id=list(end_ids), pad_token_id=pad_id,
                                                bos_token_id=saved.bos_token_id, top_k=0, top_p=1.0,
                                                repetition_penalty=1.0, no_repeat_ngram_size=0)
    try:
        yield
    finally:
        target.generation_config = saved


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens`` (``logits [..., V]``, ``tokens [...]``), float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    query_length: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the response tokens under ``model`` (sampling temperature applied to the logits).

    Args:
        input_ids, attention_mask: ``[B, P + R]``.
        query_length: ``P``.

    Returns:
        ``(logprobs [B, R], entropy [B, R] or None)`` in nats, float32. Gradients flow into ``logprobs`` when called
        outside no_grad; the entropy is a statistic and is computed without a graph.
    """
    response_len = input_ids.shape[1] - query_length
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=response_len + 1,
    )
    logits = out.logits[:, :-1].float()  # [B, R, V]: column P-1+t predicts response token t
    if temperature != 1.0:  # x / 1.0 == x: skip the [B, R, V] copy
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    tokens = input_ids[:, query_length:]
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy
