"""The stage table (flows/stages.py) is what the stage functions take: each function's leading parameters are exactly
the sections the table names, so a stage's signature says what its cache key covers."""

from __future__ import annotations

import inspect
import typing

import pytest

from rlhf_pipeline.flows.caching import stage_key
from rlhf_pipeline.flows.config import Config, load_config
from rlhf_pipeline.flows.stages import STAGE, STAGES
from tests.conftest import PROJECT_ROOT


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_a_stage_function_takes_exactly_its_declared_sections(stage):
    function = stage.function()
    hints = typing.get_type_hints(function)
    section_types = {name: field.annotation for name, field in Config.model_fields.items()}
    params = list(inspect.signature(function).parameters)
    leading = [hints[p] for p in params[: len(stage.sections)]]
    assert leading == [section_types[s] for s in stage.sections]
    # no other parameter is a configuration section: nothing the key misses reaches the stage
    assert not any(hints.get(p) in section_types.values() for p in params[len(stage.sections):])


def test_upstream_stages_come_earlier_in_the_table():
    order = [s.name for s in STAGES]
    for stage in STAGES:
        assert all(order.index(up) < order.index(stage.name) for up in stage.upstream)


def _keys(config, data_version="v1"):
    keys: dict[str, str] = {}
    for stage in STAGES:
        if stage.cached:
            keys[stage.name] = stage_key(stage.name, config, data_version, keys)
    return keys


def test_a_setting_sft_reads_changes_its_key_and_a_ppo_only_setting_reuses_sft_and_the_rm():
    params = PROJECT_ROOT / "params.yaml"
    base = _keys(load_config(params, "smoke"))
    # SFT's checkpoint selection generates responses: its lengths are SFT settings, in SFT's key
    for override in ("sft.selection_max_new_tokens=12", "sft.selection_max_prompt_tokens=32"):
        changed = _keys(load_config(params, "smoke", [override]))
        assert all(changed[s] != base[s] for s in base), override
    # PPO's own generation lengths reach neither SFT nor the RM
    for override in ("ppo.max_new_tokens=12", "ppo.max_prompt_tokens=32"):
        changed = _keys(load_config(params, "smoke", [override]))
        assert changed["sft"] == base["sft"] and changed["reward"] == base["reward"], override
        assert changed["ppo"] != base["ppo"] and changed["evaluate"] != base["evaluate"], override


def test_the_table_drives_the_summary_and_the_cli_figures():
    from rlhf_pipeline.flows.summary import Summary

    summary = Summary(PROJECT_ROOT / "unused.json")
    assert list(summary.data["stages"]) == [s.name for s in STAGES]
    assert "accuracy" in STAGE["reward"].figures and "win_rate_vs_sft" in STAGE["evaluate"].figures
