"""The configuration (flows/config.py): the retrain schedule is checked by Prefect's cron parser."""

from __future__ import annotations

import pytest

from rlhf_pipeline.flows.config import load_config
from tests.conftest import PROJECT_ROOT


def test_retrain_schedule_is_checked_with_prefects_cron_parser():
    params = PROJECT_ROOT / "params.yaml"
    assert load_config(params, "smoke", ["retrain.cron=*/15 * * * *"]).retrain.cron == "*/15 * * * *"  # not YAML: text
    for bad, message in (("retrain.cron=61 * * * *", "Invalid cron string"), ("retrain.cron=* *", "5 fields"),
                         ("retrain.timezone=Mars/Phobos", "Invalid timezone")):
        with pytest.raises(ValueError, match=message):
            load_config(params, "smoke", [bad])


@pytest.mark.parametrize("override, key", [
    ("evaluate.temperature=0", "evaluate.temperature"), ("evaluate.temperature=-1", "evaluate.temperature"),
    ("evaluate.top_p=0", "evaluate.top_p"), ("ppo.clip_range=-1", "ppo.clip_range"), ("ppo.lam=-2", "ppo.lam"),
    ("ppo.ema_decay=1.5", "ppo.ema_decay"), ("data.splits={train: 1.5, test: -0.5}", "data.splits.train"),
    ("data.max_invalid_fraction=-1", "data.max_invalid_fraction"), ("sft.max_length=0", "sft.max_length"),
    ("reward.head_l2_candidates=[]", "reward.head_l2_candidates"), ("sft.selection_prompts=0", "sft.selection_prompts"),
    ("registry.policy_name=a b/c@d", "registry.policy_name"), ("model.seed=-1", "model.seed"),
    ("ppo.kl_coef=.nan", "ppo.kl_coef"), ("data.min_rows={comparisonz: 5}", "data.min_rows"),
    ("reward.judge_split=dev", "reward.judge_split"), ("model.base=", "model.base"),
])
def test_every_number_and_name_has_its_range(override, key):
    """Issue 11, item 8: settings that used to be accepted and then failed late or silently are refused on loading,
    naming the key (the CLI turns this into one line and exit code 2)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        load_config(PROJECT_ROOT / "params.yaml", "smoke", [override])
    named = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()} | {str(info.value)}
    assert any(key in text for text in named), named


def test_ppo_batches_must_split_evenly_over_the_workers():
    """3 workers and the smoke profile's PPO batches (4, minibatches of 2, PTX batches of 2) are refused on loading,
    naming each size, instead of failing in the PPO stage after SFT and the RM have trained; 1 and 2 workers load."""
    from pydantic import ValidationError

    params = PROJECT_ROOT / "params.yaml"
    with pytest.raises(ValidationError) as info:
        load_config(params, "smoke", ["distributed.workers=3"])
    message = str(info.value)
    assert "ppo.batch_size (4), ppo.mini_batch_size (2), ppo.ptx_batch_size (2)" in message
    assert "multiple of distributed.workers (3)" in message
    for workers in (1, 2):
        assert load_config(params, "smoke", [f"distributed.workers={workers}"]).distributed.workers == workers
    # PTX off: its batch size no longer matters
    config = load_config(params, "smoke", ["distributed.workers=2", "ppo.ptx_batch_size=3", "ppo.ptx_coef=0"])
    assert config.ppo.ptx_batch_size == 3


def test_a_missing_base_model_is_refused_before_any_work(tmp_path, monkeypatch):
    """Issue 11, item 8: a model.base that does not exist fails in seconds, before the data gate, saying what is
    missing (a folder, a config.json, or a hub model while the hub is offline), never "couldn't connect"."""
    import time

    from typer.testing import CliRunner

    from rlhf_pipeline.flows.cli import app
    from rlhf_pipeline.models.loading import ModelLoadError, check_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no such model folder"):
        check_base_model(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_base_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="hub is offline"):
        check_base_model("someone/no-such-model-xyz")
    start = time.monotonic()
    result = CliRunner().invoke(app, ["run", "--profile", "smoke", "--config", str(PROJECT_ROOT / "params.yaml"),
                                      "--set", f"model.base={tmp_path / 'missing-model'}"])
    assert result.exit_code == 2, result.output
    assert "missing-model: no such model folder" in result.output and "Traceback" not in result.output
    assert time.monotonic() - start < 30
