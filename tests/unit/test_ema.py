"""The EMA of the policy's weights (models/ema.py) by hand."""

from __future__ import annotations

import pytest
import torch


def test_ema_tracks_weights_by_hand():
    from rlhf_pipeline.models.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 2
    ema.copy_to(model)
    assert model.weight.item() == pytest.approx(1.1)
