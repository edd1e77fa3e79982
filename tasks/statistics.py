"""Statistics of the evaluation and the gates: win rates with 95% Wilson intervals (InstructGPT §4.1 reports
preference against a baseline policy as a win rate)."""

from __future__ import annotations

import math

import torch


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``successes / n`` (Wilson 1927); ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(challenger: torch.Tensor, baseline: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """Fraction of prompts where ``challenger`` scores above ``baseline`` (ties count half), with a 95% Wilson interval.

    Args:
        challenger, baseline: ``[N]`` scores on the same prompts.
    """
    wins = float((challenger > baseline).sum()) + 0.5 * float((challenger == baseline).sum())
    n = int(challenger.numel())
    return wins / max(n, 1), wilson_interval(wins, n)
