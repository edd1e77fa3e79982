"""What a user reads of a run in the Prefect UI: markdown artifacts per stage (``rlhf-<stage>``), the evaluation
(``rlhf-evaluation``), the promotion decision (``rlhf-promotion``) and the retrain decision (``rlhf-retrain``).

Each artifact is built by a pure ``*_markdown`` function (tests read them without a server) and published by
:func:`publish`.
"""

from __future__ import annotations

from rlhf_pipeline.tasks.promotion import Decision


def publish(key: str, description: str, markdown: str) -> None:
    """Create the Prefect markdown artifact ``key`` in the current flow or task run."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, description=description, markdown=markdown)


def _cell(value) -> str:
    if isinstance(value, bool):
        value = str(value)
    elif isinstance(value, float):
        value = f"{value:.4g}"
    elif isinstance(value, list):
        value = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value).replace("|", "/")


def stage_markdown(stage: str, status: str, metrics: dict, link: str, note: str = "") -> str:
    """A stage's status, the link to its MLflow run and its metrics as a table."""
    rows = "\n".join(f"| {key} | {_cell(value)} |" for key, value in metrics.items())
    return f"**{stage}**: {status}{note}\n\n{link}\n\n| metric | value |\n|---|---|\n{rows}\n"


def stage_artifact(stage: str, status: str, metrics: dict, link: str, note: str = "") -> None:
    """Publish ``rlhf-<stage>`` (see :func:`stage_markdown`)."""
    publish(f"rlhf-{stage}", f"{stage}: {status}", stage_markdown(stage, status, metrics, link, note))


def evaluation_markdown(metrics: dict, link: str, report: str) -> str:
    """The evaluation's headline figures (win rates with intervals, rewards, KL, the judge's verdict) and where the
    HTML report is."""
    m = metrics
    low, high = m["win_rate_vs_sft_ci"]
    text = ("| metric | value |\n|---|---|\n"
            f"| win rate PPO vs SFT (RM) | {m['win_rate_vs_sft']:.3f} [{low:.3f}, {high:.3f}] |\n"
            f"| mean reward PPO / SFT | {m['mean_reward_policy']:.3f} / {m['mean_reward_sft']:.3f} |\n"
            f"| KL to SFT (nats) | {m['kl_to_sft']:.3f} |\n")
    if "win_rate_vs_sft_judge" in m:
        j_low, j_high = m["win_rate_vs_sft_judge_ci"]
        text += (f"| win rate PPO vs SFT (judge) | {m['win_rate_vs_sft_judge']:.3f} [{j_low:.3f}, {j_high:.3f}] |\n\n"
                 f"{m['judge_verdict']}\n\n")
    else:
        text += "\n"
    return text + f"Report: artifact `report.html` of {link}; local copy `{report}`"


def decision_markdown(decision: Decision, policy_name: str) -> str:
    """A promotion decision: the verdict, one row per gate, the figures."""
    verdict = (f"**promoted**: `{policy_name}` version {decision.challenger_version} is the champion"
               if decision.promoted else
               f"**not promoted**: `{policy_name}` version {decision.challenger_version} stays challenger; "
               f"champion stays at version {decision.previous_champion}")
    rows = "\n".join(f"| {'✅' if r.startswith('pass') else '❌'} | {r.split(': ', 1)[1]} |" for r in decision.reasons)
    figures = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in decision.figures.items() if not isinstance(v, list)
    )
    return f"{verdict}\n\n| gate | check |\n|---|---|\n{rows}\n\n| figure | value |\n|---|---|\n{figures}\n"


def promotion_artifact(markdown: str) -> None:
    """Publish ``rlhf-promotion``."""
    publish("rlhf-promotion", "champion/challenger decision", markdown)


def retrain_artifact(skipped: bool, markdown: str) -> None:
    """Publish ``rlhf-retrain``."""
    publish("rlhf-retrain", "retrain skipped" if skipped else "retrain ran", markdown)
