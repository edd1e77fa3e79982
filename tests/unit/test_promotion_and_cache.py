"""Promotion gates against hand-made figures; stage cache keys react to exactly the inputs of each stage."""

from __future__ import annotations

import math

import pytest

from flows.caching import code_version, stage_key
from flows.config import PromotionConfig, load_config
from tasks.promotion import Decision, check_gates, decision_markdown
from tasks.registry import parse_model_ref
from tests.conftest import PROJECT_ROOT

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


def test_decision_markdown_lists_every_gate():
    ok, reasons = check_gates({"has_champion": True, "win_rate_vs_champion": 0.3, "win_rate_vs_champion_ci": [0.1, 0.5],
                               "kl_to_sft": 0.2, "reward_accuracy": 0.6}, GATES)
    text = decision_markdown(Decision(ok, reasons, {"kl_to_sft": 0.2}, challenger_version=4, previous_champion=3),
                             "rlhf-policy")
    assert text.startswith("**not promoted**: `rlhf-policy` version 4 stays challenger; champion stays at version 3")
    assert text.count("| ❌ |") == 1 and text.count("| ✅ |") == 2
    assert "| kl_to_sft | 0.2000 |" in text


def test_model_references():
    assert parse_model_ref("rlhf-policy@champion") == ("rlhf-policy", "champion")
    assert parse_model_ref("models:/rlhf-policy/3") == ("rlhf-policy", "3")
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        parse_model_ref("rlhf-policy")


def _keys(config, data_version="v1"):
    keys: dict[str, str] = {}
    for name in ("sft", "reward", "ppo", "evaluate"):
        keys[name] = stage_key(name, config, data_version, keys)
    return keys


def test_a_ppo_parameter_changes_only_the_ppo_and_evaluation_keys():
    params = PROJECT_ROOT / "params.yaml"
    base = _keys(load_config(params, "smoke"))
    assert base == _keys(load_config(params, "smoke"))  # deterministic
    ppo = _keys(load_config(params, "smoke", ["ppo.learning_rate=2.0e-4"]))
    assert ppo["sft"] == base["sft"] and ppo["reward"] == base["reward"]
    assert ppo["ppo"] != base["ppo"] and ppo["evaluate"] != base["evaluate"]
    sft = _keys(load_config(params, "smoke", ["sft.learning_rate=3.0e-4"]))
    assert all(sft[s] != base[s] for s in base)  # upstream change invalidates everything downstream
    data = _keys(load_config(params, "smoke"), data_version="v2")
    assert all(data[s] != base[s] for s in base)
    # evaluation or promotion settings never retrain
    ev = _keys(load_config(params, "smoke", ["evaluate.num_prompts=4", "promotion.max_kl_to_sft=2.0"]))
    assert [ev[s] == base[s] for s in base] == [True, True, True, False]


def test_code_version_covers_the_stage_modules():
    assert code_version("ppo") != code_version("sft")
    assert len(code_version()) == 16 and code_version() == code_version()
    with pytest.raises(KeyError):
        code_version("validate")


def test_retrain_schedule_is_checked_with_prefects_cron_parser():
    params = PROJECT_ROOT / "params.yaml"
    assert load_config(params, "smoke", ["retrain.cron=*/15 * * * *"]).retrain.cron == "*/15 * * * *"  # not YAML: text
    for bad, message in (("retrain.cron=61 * * * *", "Invalid cron string"), ("retrain.cron=* *", "5 fields"),
                         ("retrain.timezone=Mars/Phobos", "Invalid timezone")):
        with pytest.raises(ValueError, match=message):
            load_config(params, "smoke", [bad])
