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


def _interval(m: dict, key: str) -> str:
    low, high = m[f"{key}_ci"]
    return f"{m[key]:.3f} [{low:.3f}, {high:.3f}]"


def evaluation_markdown(metrics: dict, link: str, report: str) -> str:
    """The evaluation's headline sentence in bold, then its figures (win rates with intervals, raw and
    length-controlled; rewards, KL, lengths and end-token fractions, the proxy-judge correlation, both perplexities,
    the judge's verdict) and where the HTML report is. Figures an older or judge-less evaluation lacks are left out."""
    m = metrics
    rows = [("win rate PPO vs SFT (RM)", _interval(m, "win_rate_vs_sft"))]
    if "win_rate_vs_sft_length_controlled" in m:
        rows.append(("win rate PPO vs SFT (RM, length-controlled)", _interval(m, "win_rate_vs_sft_length_controlled")
                     + f"; {m['reward_per_token']:.4g} reward / token"))
    if "win_rate_vs_sft_judge" in m:
        rows.append(("win rate PPO vs SFT (judge)", _interval(m, "win_rate_vs_sft_judge")))
    if "win_rate_vs_sft_judge_length_controlled" in m:
        rows.append(("win rate PPO vs SFT (judge, length-controlled)",
                     _interval(m, "win_rate_vs_sft_judge_length_controlled")))
    rows += [("mean reward PPO / SFT", f"{m['mean_reward_policy']:.3f} / {m['mean_reward_sft']:.3f}"),
             ("KL to SFT (nats)", f"{m['kl_to_sft']:.3f}")]
    if "response_length_policy" in m:
        rows.append(("mean length PPO / SFT (tokens)",
                     f"{m['response_length_policy']:.1f} / {m['response_length_sft']:.1f}"))
    if "ended_with_eos_policy" in m:
        rows.append(("ended with an end token PPO / SFT",
                     f"{m['ended_with_eos_policy']:.3f} / {m['ended_with_eos_sft']:.3f}"))
    if "proxy_judge_correlation" in m:
        rows.append(("proxy-judge correlation (Pearson)", f"{m['proxy_judge_correlation']:.3f}"))
    if "ppl_policy" in m:
        rows.append(("perplexity PPO / SFT (pretraining text)", f"{m['ppl_policy']:.3f} / {m['ppl_sft']:.3f}"))
    if "ppl_policy_heldout" in m:
        rows.append(("perplexity PPO / SFT (held-out demonstrations)",
                     f"{m['ppl_policy_heldout']:.3f} / {m['ppl_sft_heldout']:.3f}"))
    text = f"**{m['headline']}**\n\n" if m.get("headline") else ""
    text += "| metric | value |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows) + "\n"
    if m.get("judge_verdict"):
        text += f"{m['judge_verdict']}\n\n"
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
