"""Numerical precision: fp32 master weights and optimizer states always; bf16 compute when asked.

Training weights held in bf16 lose the updates of RLHF learning rates: an AdamW step of ~1e-5 relative size is below
bf16's resolution (8 bits of mantissa, a relative spacing of 2^-8 ≈ 0.004), so most of it rounds away (measured on the
tiny model at lr 9.65e-6: 15% of weights changed after 3 steps, none of the norms, against 100% in fp32). So every
trained model is loaded and updated in fp32 (the master copy), and bf16 is used for the arithmetic only: autocast in one
process, FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` across workers (Micikevicius et al.
2018, "Mixed Precision Training", §3: an fp32 master copy of the weights).

``model.precision``: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, or ``bf16`` (also on CPU, through CPU autocast, so
the bf16 path runs in the tests here).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the arithmetic: ``bfloat16`` for ``bf16`` (and ``auto`` on CUDA), else ``float32``.

    Raises:
        ValueError: for an unknown setting.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"model.precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Run the block's matmuls in ``dtype`` over fp32 weights (torch autocast on ``device``); nothing when fp32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
