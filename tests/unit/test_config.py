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
