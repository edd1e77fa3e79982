"""Prefect artifacts (flows/artifacts.py): the promotion decision's markdown."""

from __future__ import annotations

from rlhf_pipeline.flows.artifacts import decision_markdown
from rlhf_pipeline.tasks.promotion import Decision, PromotionConfig, check_gates

GATES = PromotionConfig(min_win_rate_vs_champion=0.5, max_kl_to_sft=5.0, min_reward_accuracy=0.55)


def test_decision_markdown_lists_every_gate():
    ok, reasons = check_gates({"has_champion": True, "win_rate_vs_champion": 0.3, "win_rate_vs_champion_ci": [0.1, 0.5],
                               "kl_to_sft": 0.2, "reward_accuracy": 0.6}, GATES)
    text = decision_markdown(Decision(ok, reasons, {"kl_to_sft": 0.2}, challenger_version=4, previous_champion=3),
                             "rlhf-policy")
    assert text.startswith("**not promoted**: `rlhf-policy` version 4 stays challenger; champion stays at version 3")
    assert text.count("| ❌ |") == 1 and text.count("| ✅ |") == 2
    assert "| kl_to_sft | 0.2000 |" in text


def test_evaluation_markdown_opens_with_the_headline_in_bold():
    from rlhf_pipeline.flows.artifacts import evaluation_markdown

    headline = "No measurable gain over SFT: the win rate under the training RM, 0.53 [0.41, 0.64] includes 0.5."
    metrics = {"headline": headline, "win_rate_vs_sft": 0.53, "win_rate_vs_sft_ci": [0.41, 0.64],
               "win_rate_vs_sft_length_controlled": 0.5, "win_rate_vs_sft_length_controlled_ci": [0.38, 0.62],
               "reward_per_token": 0.0123,
               "win_rate_vs_sft_judge": 0.55, "win_rate_vs_sft_judge_ci": [0.43, 0.66],
               "win_rate_vs_sft_judge_length_controlled": 0.52, "win_rate_vs_sft_judge_length_controlled_ci": [0.4, 0.64],
               "mean_reward_policy": 0.3, "mean_reward_sft": 0.2, "kl_to_sft": 0.31,
               "response_length_policy": 30.5, "response_length_sft": 28.25,
               "ended_with_eos_policy": 0.875, "ended_with_eos_sft": 0.9375, "proxy_judge_correlation": 0.42,
               "ppl_sft": 15.0, "ppl_policy": 15.5, "ppl_sft_heldout": 9.0, "ppl_policy_heldout": 9.25,
               "judge_verdict": "The judge RM's verdicts carry no information."}
    text = evaluation_markdown(metrics, "http://mlflow/run", "runs/x/evaluate/report.html")
    assert text.startswith(f"**{headline}**\n\n| metric | value |")
    for row in ("| win rate PPO vs SFT (RM) | 0.530 [0.410, 0.640] |",
                "| win rate PPO vs SFT (RM, length-controlled) | 0.500 [0.380, 0.620]; 0.0123 reward / token |",
                "| win rate PPO vs SFT (judge, length-controlled) | 0.520 [0.400, 0.640] |",
                "| mean length PPO / SFT (tokens) | 30.5 / 28.2 |",
                "| ended with an end token PPO / SFT | 0.875 / 0.938 |",
                "| proxy-judge correlation (Pearson) | 0.420 |",
                "| perplexity PPO / SFT (pretraining text) | 15.500 / 15.000 |",
                "| perplexity PPO / SFT (held-out demonstrations) | 9.250 / 9.000 |"):
        assert row in text, row
    assert text.index("| win rate PPO vs SFT (RM) |") < text.index("The judge RM's verdicts") < text.index("Report:")
    # an evaluation without a judge or the new figures still renders
    old = evaluation_markdown({k: metrics[k] for k in ("win_rate_vs_sft", "win_rate_vs_sft_ci", "mean_reward_policy",
                                                       "mean_reward_sft", "kl_to_sft")}, "link", "report.html")
    assert old.startswith("| metric | value |") and "judge" not in old
