"""Plots for people who would rather look than read: PPO's curves over steps, the win rates (raw and
length-controlled), and the self-contained HTML report that opens with the evaluation's headline sentence."""

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


def plot_win_rates(rows: list[tuple[str, float, float, float]], path: str | Path) -> Path:
    """Horizontal bars of win rates with their 95% intervals; ``rows`` are ``(label, rate, low, high)`` (a label
    containing "length-controlled" gets a lighter bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.6 * len(rows)), constrained_layout=True)
    labels = [r[0] for r in rows]
    rates = [r[1] for r in rows]
    errors = [[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]
    colors = ["#a1b5d8" if "length-controlled" in label else "#4c72b0" for label in labels]
    ax.barh(labels, rates, xerr=errors, capsize=4, color=colors)
    ax.invert_yaxis()  # the first row on top
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (95% interval); 0.5 = no better than SFT")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _img(path: Path) -> str:
    import base64

    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:100%">'


def write_html_report(
    path: str | Path,
    metrics: dict[str, dict],
    history: list[dict[str, float]],
    samples: list[dict],
    title: str = "RLHF evaluation report",
) -> Path:
    """A self-contained HTML report: the evaluation's headline sentence (``metrics["evaluate"]["headline"]``, when
    present) in a prominent paragraph under the title, headline figures per stage, PPO curves (reward, KL, length...),
    win rates with intervals (raw and length-controlled, training RM and judge), and the sample table (prompt, SFT and
    PPO responses with their rewards).

    Args:
        path: the HTML file to write (PNG plots are embedded, so the file stands alone as an MLflow artifact).
        metrics: ``{stage: {metric: value}}`` (the summary's stage metrics).
        history: PPO's per-step figures.
        samples: rows of ``samples.jsonl``.
    """
    import html
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}"
             "th{background:#f3f3f3} .headline{font-size:1.3em;font-weight:bold;padding:0.6em 0.8em;"
             "background:#f5f7fb;border-left:4px solid #4c72b0}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    evaluation = metrics.get("evaluate", {})
    if evaluation.get("headline"):
        parts.append(f"<p class='headline'>{html.escape(str(evaluation['headline']))}</p>")
    parts.append("<h2>Figures</h2><table><tr><th>stage</th><th>metric</th><th>value</th></tr>")
    for stage, values in metrics.items():
        for key, value in values.items():
            shown = f"[{value[0]:.3f}, {value[1]:.3f}]" if isinstance(value, list) else (
                f"{value:.4g}" if isinstance(value, float) else html.escape(str(value)))
            parts.append(f"<tr><td>{stage}</td><td>{html.escape(key)}</td><td>{shown}</td></tr>")
    parts.append("</table>")
    with tempfile.TemporaryDirectory() as tmp:
        if history:
            parts.append("<h2>PPO over steps</h2>" + _img(plot_ppo_curves(history, Path(tmp) / "ppo.png")))
        rows = []
        for key, label in (("win_rate_vs_sft", "PPO vs SFT (training RM)"),
                           ("win_rate_vs_sft_length_controlled", "PPO vs SFT (training RM, length-controlled)"),
                           ("win_rate_vs_sft_judge", "PPO vs SFT (judge RM)"),
                           ("win_rate_vs_sft_judge_length_controlled", "PPO vs SFT (judge RM, length-controlled)")):
            if key in evaluation and f"{key}_ci" in evaluation:
                low, high = evaluation[f"{key}_ci"]
                rows.append((label, evaluation[key], low, high))
        if rows:
            parts.append("<h2>Win rates</h2>" + _img(plot_win_rates(rows, Path(tmp) / "win.png")))
    parts.append("<h2>Samples</h2><p>Held-out prompts (red-teaming data: may contain offensive text).</p>"
                 "<table><tr><th>prompt</th><th>SFT</th><th>reward</th><th>PPO</th><th>reward</th></tr>")
    for s in samples:
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(s[k]))}</td>" if not isinstance(s[k], float)
                                      else f"<td>{s[k]:.3f}</td>"
                                      for k in ("prompt", "sft_response", "sft_reward", "policy_response",
                                                "policy_reward")) + "</tr>")
    parts.append("</table></body></html>")
    path.write_text("\n".join(parts))
    return path
