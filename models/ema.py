"""Exponential moving average of a model's trained weights (InstructGPT App. C.4: the PPO policy's EMA, decay 0.992,
is the model that is evaluated and kept)."""

from __future__ import annotations

import torch


class EMA:
    """An fp32 shadow of every trainable parameter of ``model``: ``shadow ← decay · shadow + (1 − decay) · θ`` after
    each update (:meth:`update`); :meth:`copy_to` writes the shadow into the model.

    The shadow is kept in fp32 whatever the compute precision (an average moving by ``1 − decay`` of an update
    per step would round away in bf16), and has the parameters' layout: sharded when they are (FSDP2 DTensors), only
    the adapters for a LoRA model.

    Args:
        model: the trained model (its parameters with ``requires_grad``).
        decay: the weight of the old average, in [0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().to(torch.float32, copy=True)
                       for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))
