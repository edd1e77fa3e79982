"""The coefficient β of the per-token KL penalty (InstructGPT §3.5 eq. 2): fixed (the paper, β = 0.02) or adaptive
(Ziegler et al. 2019 §2.2), which steers the measured KL towards a target."""

from __future__ import annotations


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (§2.2), used in InstructGPT-style PPO.

    After each step with measured KL ``kl`` (nats per episode): ``e = clip(kl / target − 1, −0.2, 0.2)``,
    ``β ← β · (1 + e · n_steps / horizon)``.

    Args:
        init_kl_coef: starting β.
        target: the KL the controller steers towards.
        horizon: how many episodes it takes to close most of the gap.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> float:
        """Update β from the last batch's KL over ``n_steps`` episodes; returns the new β."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant β (the paper's default, β = 0.02)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> float:
        return self.value
