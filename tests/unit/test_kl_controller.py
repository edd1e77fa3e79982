"""The KL coefficient's controllers (models/kl_controller.py) by hand."""

from __future__ import annotations

import pytest


def test_adaptive_kl_controller_by_hand():
    from rlhf_pipeline.models.kl_controller import AdaptiveKLController, FixedKLController

    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 9 over target 6: error clipped to +0.2; beta *= 1 + 0.2 * 10 / 100
    assert ctl.update(9.0, n_steps=10) == pytest.approx(0.1 * 1.02)
    # KL 3: error -0.5 clipped to -0.2
    assert ctl.update(3.0, n_steps=10) == pytest.approx(0.1 * 1.02 * 0.98)
    # KL 6.6: error +0.1
    assert ctl.update(6.6, n_steps=50) == pytest.approx(0.1 * 1.02 * 0.98 * 1.05)
    assert FixedKLController(0.02).update(100.0, 8) == 0.02
