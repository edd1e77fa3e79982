"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1) per trained model, with peft.

A LoRA model trains ``r``-rank updates ``B·A`` (scaled by ``alpha / r``) beside frozen weight matrices; the scalar head
of a reward or value model is trained whole (``modules_to_save``). Two uses beyond memory:

- PPO's reference model is the policy with its adapters disabled (:func:`adapters_disabled`): one backbone in memory,
  and its log-probabilities equal the SFT model's exactly, since the frozen weights are the SFT weights.
- What is saved and registered is :func:`merged`: plain full weights that transformers loads without peft.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: the attention and MLP projections of Llama-style models (SmolLM2, Llama, Mistral, Qwen)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str] | tuple[str, ...],
             scalar_head: bool = False) -> torch.nn.Module:
    """Wrap a transformers model with LoRA adapters of rank ``r`` on ``target_modules``; only the adapters (and, with
    ``scalar_head``, the head ``score``) are trainable. Returns the peft model (the input is modified in place).

    Raises:
        ValueError: when ``r < 1`` or no module of the model matches ``target_modules``.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not names & set(target_modules):
        raise ValueError(f"no module named {', '.join(target_modules)} in {type(model).__name__}; set lora.target_modules "
                         f"to some of: {', '.join(sorted(n for n in names if n.endswith('proj')) or sorted(names)[:20])}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type=TaskType.SEQ_CLS if scalar_head else TaskType.CAUSAL_LM,
                        modules_to_save=["score"] if scalar_head else None)
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a module inside it) carries peft adapters."""
    from peft import PeftModel

    return any(isinstance(m, PeftModel) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model inside the block: every LoRA adapter of ``model`` is bypassed (PPO's reference). The identity for
    a model without adapters."""
    from peft import PeftModel

    peft = next((m for m in model.modules() if isinstance(m, PeftModel)), None)
    if peft is None:
        yield model
        return
    with peft.disable_adapter():
        yield model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with every adapter merged into its weights (in place; call at the end). The
    identity for a model without adapters."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model
