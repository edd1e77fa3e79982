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
