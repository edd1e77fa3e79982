"""Statistics of the evaluation and the gates: win rates with 95% Wilson intervals (InstructGPT §4.1 reports
preference against a baseline policy as a win rate), a length-controlled win rate and the Pearson correlation of two
scorers."""

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


def win_rate(challenger: torch.Tensor, baseline: torch.Tensor, tol: float = 0.0) -> tuple[float, tuple[float, float]]:
    """Fraction of prompts where ``challenger`` scores above ``baseline`` (ties count half), with a 95% Wilson interval.

    Args:
        challenger, baseline: ``[N]`` scores on the same prompts.
        tol: differences of at most this much count as ties (0: only equal scores tie).
    """
    diff = challenger - baseline
    ties = diff.abs() <= tol
    wins = float((~ties & (diff > 0)).sum()) + 0.5 * float(ties.sum())
    n = int(challenger.numel())
    return wins / max(n, 1), wilson_interval(wins, n)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two ``[N]`` vectors (computed in float64): ``cov(x, y) / (std(x) · std(y))``, in
    ``[-1, 1]``, unitless.

    NaN-safe: ``nan`` (never an exception) when fewer than two pairs, when either vector is constant (zero variance) or
    when a value is not finite.

    Raises:
        ValueError: when ``x`` and ``y`` differ in length.
    """
    x, y = x.detach().double().flatten().cpu(), y.detach().double().flatten().cpu()
    if x.numel() != y.numel():
        raise ValueError(f"pearson: {x.numel()} values against {y.numel()}")
    if x.numel() < 2 or not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float((dx * dx).sum()), float((dy * dy).sum())
    if sxx == 0.0 or syy == 0.0:
        return float("nan")
    return max(-1.0, min(1.0, float((dx * dy).sum()) / math.sqrt(sxx * syy)))


def length_controlled_win_rate(
    challenger: torch.Tensor,
    baseline: torch.Tensor,
    challenger_lengths: torch.Tensor,
    baseline_lengths: torch.Tensor,
) -> tuple[float, tuple[float, float], float]:
    """Win rate of ``challenger`` over ``baseline`` with the part of the scores explained by response length removed
    (regression adjustment of length).

    Method: fit ``score = a + b · length`` by ordinary least squares over all ``2N`` samples (both policies pooled),
    subtract ``b · length`` from every score and compute :func:`win_rate` on the residuals (ties count half, 95% Wilson
    interval). Residual differences within float32 rounding of the scores (``1e-6`` of the largest absolute score)
    count as ties, so a score that is an exact linear function of length gives 0.5. With constant lengths ``b`` is 0
    and the result is the raw win rate. This is a simplification of the length-controlled win rate of Dubois et al.
    2024, "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators" (which fits a GLM of the
    preference on the length difference and predicts it at zero length difference).

    Args:
        challenger, baseline: ``[N]`` scores (reward-model units) on the same prompts.
        challenger_lengths, baseline_lengths: ``[N]`` response lengths in tokens.

    Returns:
        ``(rate, (low, high), b)``: the length-controlled win rate in ``[0, 1]``, its 95% interval and the fitted slope
        ``b`` (score units per token).

    Raises:
        ValueError: when the four vectors differ in length.
    """
    vectors = [v.detach().double().flatten().cpu() for v in (challenger, baseline, challenger_lengths, baseline_lengths)]
    if len({v.numel() for v in vectors}) != 1:
        raise ValueError(f"length_controlled_win_rate: lengths differ: {[v.numel() for v in vectors]}")
    challenger, baseline, challenger_lengths, baseline_lengths = vectors
    scores = torch.cat([challenger, baseline])
    lengths = torch.cat([challenger_lengths, baseline_lengths])
    dl = lengths - lengths.mean()
    sll = float((dl * dl).sum())
    slope = float((dl * (scores - scores.mean())).sum()) / sll if sll > 0 else 0.0
    tol = 1e-6 * float(scores.abs().max()) if scores.numel() else 0.0
    rate, interval = win_rate(challenger - slope * challenger_lengths, baseline - slope * baseline_lengths, tol)
    return rate, interval, slope
