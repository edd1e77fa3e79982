"""Stage cache keys (flows/caching.py) react to exactly the inputs of each stage."""

from __future__ import annotations

import pytest

from rlhf_pipeline.flows.caching import code_version, stage_key
from rlhf_pipeline.flows.config import load_config
from tests.conftest import PROJECT_ROOT


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
    # issue 8: SFT's checkpoint-selection generations are SFT's own settings, in its key; PPO's lengths are not
    selection = _keys(load_config(params, "smoke", ["sft.selection_max_new_tokens=5"]))
    assert selection["sft"] != base["sft"]
    lengths = _keys(load_config(params, "smoke", ["ppo.max_new_tokens=5", "ppo.max_prompt_tokens=40"]))
    assert lengths["sft"] == base["sft"] and lengths["reward"] == base["reward"] and lengths["ppo"] != base["ppo"]
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
