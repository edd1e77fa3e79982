"""The registry (flows/registry.py): model references."""

from __future__ import annotations

import pytest

from rlhf_pipeline.flows.registry import parse_model_ref


def test_model_references():
    assert parse_model_ref("rlhf-policy@champion") == ("rlhf-policy", "champion")
    assert parse_model_ref("models:/rlhf-policy/3") == ("rlhf-policy", "3")
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        parse_model_ref("rlhf-policy")
