"""The reward model and the value model: a transformer backbone with a scalar head (InstructGPT §3.5, App. C.2, C.4).

The reward model is the SFT model with its LM head replaced by a linear head to one scalar; the score of a
(prompt, response) sequence is the head's output at the sequence's last real token (the response's EOS), found from the
attention mask so it is right under left or right padding and when the pad token equals the EOS token. The value model
is the same class initialised from the reward model, read at every token.

Two variations change what the head reads (the head-mode RM and its judge use them, see
:mod:`rlhf_pipeline.tasks.reward`, so that the judge does not read the RM's features): a backbone cut to its first
``num_layers`` blocks (the final norm kept; the saved config says how many), and ``mean`` pooling, where the head reads
the mean of the final hidden states over the response's tokens instead of the last token's (stored in ``config.json``
as ``rlhf_pooling``). A ``mean`` model needs to know where the response is: its callers pass ``response_mask``.

Saved folders are transformers ``*ForSequenceClassification`` checkpoints (``num_labels=1``, safetensors), loadable
with ``AutoModelForSequenceClassification``; the normalisation bias is stored in ``config.json`` as ``rlhf_reward_bias``.
Note that transformers' own pooling picks the last non-pad token by id, which is wrong when pad == EOS: score through
:meth:`ScalarHeadModel.score` here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from rlhf_pipeline.models.tokens import encode_pair, last_token_index, pad_pairs, position_ids_from_mask


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
          response_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, H]`` from ``[B, T, H]`` hidden states: the last real token's (``last``) or the mean over the response's
    tokens (``mean``, ``response_mask`` ``[B, T]`` 1 on them).

    Raises:
        ValueError: for ``mean`` without a ``response_mask``.
    """
    if pooling == "mean":
        if response_mask is None:
            raise ValueError("a reward model with mean pooling averages over the response: pass response_mask")
        weights = (response_mask * attention_mask).to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]


class ScalarHeadModel(nn.Module):
    """A backbone with a linear head to one scalar per position: the reward model, and the value model.

    Args:
        seq_cls: a transformers ``*ForSequenceClassification`` model with ``num_labels == 1`` (its ``base_model`` is
            the backbone, its ``score`` the head).
        bias: added to every score (the RM's normalisation, App. C.2).
        pooling: what the head reads for a whole sequence: ``"last"`` (the last real token's hidden state, the paper)
            or ``"mean"`` (the mean over the response's tokens).

    Raises:
        ValueError: for an unknown ``pooling``.
    """

    POOLINGS = ("last", "mean")

    def __init__(self, seq_cls, bias: float = 0.0, pooling: str = "last"):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: expected one of {self.POOLINGS}")
        self.seq_cls = seq_cls
        self.pooling = pooling
        self.register_buffer("bias", torch.tensor(float(bias)), persistent=False)

    def _transformer(self) -> nn.Module:
        """The ``*ForSequenceClassification`` model (inside its peft wrapper when it has LoRA adapters)."""
        return self.seq_cls.get_base_model() if hasattr(self.seq_cls, "get_base_model") else self.seq_cls

    @property
    def backbone(self) -> nn.Module:
        return self._transformer().base_model

    @property
    def head(self) -> nn.Module:
        return self._transformer().score

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                        num_layers: int | None = None, pooling: str | None = None):
        """Load from a causal-LM folder (new random head) or a saved scalar-head folder (head, bias and pooling
        restored).

        Args:
            num_layers: keep only the first this many transformer blocks (``None``: all of them).
            pooling: ``"last"`` or ``"mean"`` (``None``: the folder's ``rlhf_pooling``, else ``"last"``).

        Raises:
            ValueError: when ``num_layers`` is not between 1 and the model's number of blocks, or for an unknown
                pooling.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        config = AutoConfig.from_pretrained(str(path))
        config.num_labels = 1
        if num_layers is not None:
            if not 1 <= num_layers <= config.num_hidden_layers:
                raise ValueError(f"num_layers must be between 1 and the {config.num_hidden_layers} blocks of {path}, "
                                 f"got {num_layers}")
            config.num_hidden_layers = num_layers
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = config.layer_types[:num_layers]
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(config, "eos_token_id", None)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialised" is expected from an LM checkpoint
        try:
            seq_cls = AutoModelForSequenceClassification.from_pretrained(str(path), config=config, dtype=dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        bias = float(getattr(config, "rlhf_reward_bias", 0.0) or 0.0)
        return cls(seq_cls, bias=bias, pooling=pooling or getattr(config, "rlhf_pooling", None) or "last").to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, what: str = "score",
                views: tuple[tuple[int, str], ...] = (), response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's outputs for ``[B, T]`` ids and mask (every method below goes through here, so a sharded model's
        hooks run): ``what`` is ``"score"`` (``[B]`` reward read at each sequence's last real token), ``"values"``
        (``[B, T]``, the value model's V(s_t) at every position), ``"features"`` (``[B, H]``, what the head reads: the
        last real token's hidden state, or the mean over the response under ``mean`` pooling), ``"hidden"``
        (``[B, T, H]``) or ``"views"`` (``[B, V, H]``: for each ``(num_layers, pooling)`` of ``views``, the features a
        model cut to its first ``num_layers`` blocks with that pooling reads, all from this one forward pass).
        Scores, values and features are float32. ``response_mask`` (``[B, T]``, 1 on the response's tokens) is needed
        by ``mean`` pooling and ignored otherwise.

        Raises:
            ValueError: for an unknown ``what`` or pooling, a view deeper than this model, or ``mean`` pooling without
                ``response_mask``.
        """
        if what not in ("score", "values", "features", "hidden", "views"):
            raise ValueError(f"unknown output {what!r}")
        blocks = len(self.backbone.layers)
        if what == "views" and not all(1 <= n <= blocks and pool in self.POOLINGS for n, pool in views):
            raise ValueError(f"views {views} need 1..{blocks} blocks and a pooling in {self.POOLINGS}")
        output = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            output_hidden_states=what == "views",
        )
        hidden = output.last_hidden_state
        if what == "hidden":
            return hidden
        if what == "values":
            return self.head(hidden).squeeze(-1).float() + self.bias
        if what == "views":  # hidden_states[n] is the n-th block's output before the final norm
            return torch.stack([_pool(hidden if n == blocks else self.backbone.norm(output.hidden_states[n]),
                                      attention_mask, pool, response_mask).float() for n, pool in views], 1)
        features = _pool(hidden, attention_mask, self.pooling, response_mask)
        if what == "features":
            return features.float()
        return self.head(features).squeeze(-1).float() + self.bias

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` last hidden states of the backbone."""
        return self(input_ids, attention_mask, "hidden")

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` scalar output at every position (the value model's V(s_t)); float32."""
        return self(input_ids, attention_mask, "values")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` reward of each whole sequence, read at its last real token (or averaged over ``response_mask``'s
        tokens, see ``pooling``); float32."""
        return self(input_ids, attention_mask, "score", response_mask=response_mask)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, H]`` backbone features the head reads (see ``pooling``); float32."""
        return self(input_ids, attention_mask, "features", response_mask=response_mask)

    def save_pretrained(self, path: str | Path) -> None:
        """Save as a plain transformers sequence-classification folder (safetensors; LoRA adapters merged into the
        weights) with the bias and the pooling in the config."""
        from rlhf_pipeline.models.lora import merged

        self.seq_cls = merged(self.seq_cls)
        self.seq_cls.config.rlhf_reward_bias = float(self.bias)
        self.seq_cls.config.rlhf_pooling = self.pooling
        self.seq_cls.save_pretrained(str(path), safe_serialization=True)


@torch.no_grad()
def score_texts(
    model: ScalarHeadModel,
    tokenizer,
    prompts: list[list[dict]],
    responses: list[str],
    max_length: int,
    batch_size: int = 8,
    features: bool = False,
    engine=None,
    views: tuple[tuple[int, str], ...] = (),
    advance=None,
) -> torch.Tensor:
    """Score (prompt, response) pairs with the reward model: ``[N]`` rewards, or ``[N, H]`` features if ``features``,
    or ``[N, V, H]`` features of several ``(num_layers, pooling)`` views from one forward pass each if ``views`` (see
    :meth:`ScalarHeadModel.forward`).

    All the sequences are sorted by token length and batched to limit padding (pass the whole set in one call: the
    padding is then only the length difference of neighbours); the result is in input order. With an ``engine``
    (:class:`rlhf_pipeline.models.distributed.Engine`) the batches run in its compute precision and are shared out over
    its workers (every worker gets the whole result). ``advance(n)``, if given, is called after each batch with the
    number of sequences it stands for (a progress bar's callback; with N workers, N times the batch).
    """
    from rlhf_pipeline.models import distributed

    here = engine.world if engine is not None else distributed.World()
    device = next(model.parameters()).device
    parts = [encode_pair(tokenizer, p, r, max_length, split=True) for p, r in zip(prompts, responses)]
    order = sorted(range(len(parts)), key=lambda i: len(parts[i][0]) + len(parts[i][1]))
    done: list[tuple[list[int], torch.Tensor]] = []
    for positions in distributed.batches(len(order), batch_size, here):
        idx = [order[p] for p in positions] or order[:1]  # an empty batch: a stand-in forward, dropped
        ids, mask, response_mask = (t.to(device) for t in pad_pairs([parts[i] for i in idx], tokenizer.pad_token_id))
        with engine.autocast() if engine is not None else contextlib.nullcontext():
            values = (model(ids, mask, "views", views, response_mask) if views else
                      model(ids, mask, "features" if features else "score", response_mask=response_mask))
        if positions:
            done.append((idx, values.float().cpu()))
            if advance is not None:  # each worker runs its share: the worker shown counts for all
                advance(len(positions) * here.size)
    out: list[torch.Tensor | None] = [None] * len(parts)
    for part in distributed.gather_objects(done):
        for idx, values in part:
            for j, i in enumerate(idx):
                out[i] = values[j]
    return torch.stack(out)  # type: ignore[arg-type]
