"""The promotion gates (tasks/promotion.py) against hand-made figures."""

from __future__ import annotations

import math

from rlhf_pipeline.tasks.promotion import PromotionConfig, check_gates

GATES = PromotionConfig(min_win_rate_vs_champion=0.5, max_kl_to_sft=5.0, min_reward_accuracy=0.55)


def test_first_run_has_no_win_rate_gate_and_passes_on_kl_and_accuracy():
    ok, reasons = check_gates({"has_champion": False, "kl_to_sft": 0.44, "reward_accuracy": 0.60}, GATES)
    assert ok
    assert reasons == [
        "pass: no champion yet: no win-rate gate",
        "pass: KL to SFT 0.440 nats <= 5.000",
        "pass: reward-model accuracy 0.600 >= 0.550",
    ]


def test_each_gate_can_fail_on_its_own():
    base = {"has_champion": True, "win_rate_vs_champion": 0.62, "win_rate_vs_champion_ci": [0.45, 0.77],
            "kl_to_sft": 0.44, "reward_accuracy": 0.60}
    assert check_gates(base, GATES)[0]
    ok, reasons = check_gates({**base, "win_rate_vs_champion": 0.40}, GATES)
    assert not ok and reasons[0] == "FAIL: win rate over the champion (judge) 0.400 [0.450, 0.770] < 0.500"
    ok, reasons = check_gates({**base, "kl_to_sft": 41.7}, GATES)
    assert not ok and reasons[1] == "FAIL: KL to SFT 41.700 nats > 5.000"
    ok, reasons = check_gates({**base, "reward_accuracy": 0.508}, GATES)
    assert not ok and reasons[2] == "FAIL: reward-model accuracy 0.508 < 0.550"


def test_missing_or_nan_figures_fail_their_gate():
    ok, reasons = check_gates({"has_champion": True, "win_rate_vs_champion": None, "kl_to_sft": math.nan,
                               "reward_accuracy": 0.7}, GATES)
    assert not ok
    assert reasons[0].startswith("FAIL: win rate over the champion (judge) nan")
    assert reasons[1] == "FAIL: KL to SFT nan nats > 5.000"


def test_informative_judge_gate_only_when_asked():
    figures = {"has_champion": False, "kl_to_sft": 0.1, "reward_accuracy": 0.6, "judge_informative": False}
    assert check_gates(figures, GATES)[0]
    strict = GATES.model_copy(update={"require_informative_judge": True})
    ok, reasons = check_gates(figures, strict)
    assert not ok and reasons[-1] == "FAIL: the judge does not beat the 'shorter reply wins' baseline"
