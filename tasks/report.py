"""Plots for people who would rather look than read: PPO's curves over steps."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("ppo/score", "RM score (mean)"),
    ("ppo/kl", "KL to reference (nats / episode)"),
    ("ppo/response_length", "response length (tokens)"),
    ("ppo/entropy", "policy entropy (nats / token)"),
    ("ppo/clipfrac", "clip fraction"),
    ("ppo/value_loss", "value loss"),
)


def plot_ppo_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Draw reward, KL, length, entropy, clip fraction and value loss over PPO steps into a PNG.

    Args:
        history: one dict of ``ppo/*`` figures per step (``tasks.ppo`` writes it as ``history.json``).
        path: the PNG to write.

    Raises:
        ValueError: when ``history`` is empty.
    """
    if not history:
        raise ValueError("no PPO steps to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(history) + 1))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.suptitle("PPO training curves")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
