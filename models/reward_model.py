"""The reward model and the value model: a transformer backbone with a scalar head (InstructGPT §3.5, App. C.2, C.4).

The reward model is the SFT model with its LM head replaced by a linear head to one scalar; the score of a
(prompt, response) sequence is the head's output at the sequence's last real token (the response's EOS), found from the
attention mask so it is right under left or right padding and when the pad token equals the EOS token. The value model
is the same class initialised from the reward model, read at every token.

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

from rlhf_pipeline.models.tokens import encode_pair, last_token_index, pad_sequences, position_ids_from_mask


class ScalarHeadModel(nn.Module):
    """A backbone with a linear head to one scalar per position: the reward model, and the value model.

    Args:
        seq_cls: a transformers ``*ForSequenceClassification`` model with ``num_labels == 1`` (its ``base_model`` is
            the backbone, its ``score`` the head).
        bias: added to every score (the RM's normalisation, App. C.2).
    """

    def __init__(self, seq_cls, bias: float = 0.0):
        super().__init__()
        self.seq_cls = seq_cls
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
    def from_pretrained(cls, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
        """Load from a causal-LM folder (new random head) or a saved scalar-head folder (head and bias restored)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        config = AutoConfig.from_pretrained(str(path))
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(config, "eos_token_id", None)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialised" is expected from an LM checkpoint
        try:
            seq_cls = AutoModelForSequenceClassification.from_pretrained(str(path), config=config, dtype=dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        bias = float(getattr(config, "rlhf_reward_bias", 0.0) or 0.0)
        return cls(seq_cls, bias=bias).to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, what: str = "score") -> torch.Tensor:
        """The model's outputs for ``[B, T]`` ids and mask (every method below goes through here, so a sharded model's
        hooks run): ``what`` is ``"score"`` (``[B]`` reward read at each sequence's last real token), ``"values"``
        (``[B, T]``, the value model's V(s_t) at every position), ``"features"`` (``[B, H]``, what the head reads) or
        ``"hidden"`` (``[B, T, H]``). Scores, values and features are float32.

        Raises:
            ValueError: for an unknown ``what``.
        """
        if what not in ("score", "values", "features", "hidden"):
            raise ValueError(f"unknown output {what!r}")
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        if what == "hidden":
            return hidden
        if what == "values":
            return self.head(hidden).squeeze(-1).float() + self.bias
        features = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        if what == "features":
            return features.float()
        return self.head(features).squeeze(-1).float() + self.bias

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` last hidden states of the backbone."""
        return self(input_ids, attention_mask, "hidden")

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` scalar output at every position (the value model's V(s_t)); float32."""
        return self(input_ids, attention_mask, "values")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` reward of each whole sequence, read at its last real token; float32."""
        return self(input_ids, attention_mask, "score")

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` backbone features at the last real token (what the head reads); float32."""
        return self(input_ids, attention_mask, "features")

    def save_pretrained(self, path: str | Path) -> None:
        """Save as a plain transformers sequence-classification folder (safetensors; LoRA adapters merged into the
        weights) with the bias in the config."""
        from rlhf_pipeline.models.lora import merged

        self.seq_cls = merged(self.seq_cls)
        self.seq_cls.config.rlhf_reward_bias = float(self.bias)
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
) -> torch.Tensor:
    """Score (prompt, response) pairs with the reward model: ``[N]`` rewards, or ``[N, H]`` features if ``features``.

    Sequences are sorted by length and batched to limit padding; the result is in input order. With an ``engine``
    (:class:`rlhf_pipeline.models.distributed.Engine`) the batches run in its compute precision and are shared out over
    its workers (every worker gets the whole result).
    """
    from rlhf_pipeline.models import distributed

    here = engine.world if engine is not None else distributed.World()
    device = next(model.parameters()).device
    seqs = [encode_pair(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    done: list[tuple[list[int], torch.Tensor]] = []
    for positions in distributed.batches(len(order), batch_size, here):
        idx = [order[p] for p in positions] or order[:1]  # an empty batch: a stand-in forward, dropped
        ids, mask = pad_sequences([seqs[i] for i in idx], tokenizer.pad_token_id, side="right")
        with engine.autocast() if engine is not None else contextlib.nullcontext():
            values = model(ids.to(device), mask.to(device), "features" if features else "score")
        if positions:
            done.append((idx, values.float().cpu()))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for part in distributed.gather_objects(done):
        for idx, values in part:
            for j, i in enumerate(idx):
                out[i] = values[j]
    return torch.stack(out)  # type: ignore[arg-type]
