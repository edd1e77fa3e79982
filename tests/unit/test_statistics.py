"""Statistics of the evaluation (tasks/statistics.py): the Pearson correlation of two scorers and the length-controlled
win rate, checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_pipeline.tasks.statistics import length_controlled_win_rate, pearson, wilson_interval, win_rate


def test_pearson_on_a_small_vector_by_hand():
    # x = [1, 2, 3, 4], y = [2, 4, 5, 9]: dx = [-1.5, -0.5, 0.5, 1.5], dy = [-3, -1, 0, 4]
    # sum dx·dy = 4.5 + 0.5 + 0 + 6 = 11; sum dx² = 5; sum dy² = 9 + 1 + 0 + 16 = 26
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, 5.0, 9.0])
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26), abs=1e-12)
    assert pearson(x, -y) == pytest.approx(-11 / math.sqrt(5 * 26), abs=1e-12)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0, abs=1e-12)


def test_pearson_is_nan_not_an_exception_when_it_is_undefined():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert math.isnan(pearson(x, torch.full((3,), 0.7)))  # a constant vector: zero variance
    assert math.isnan(pearson(torch.zeros(3), x))
    assert math.isnan(pearson(torch.tensor([1.0]), torch.tensor([2.0])))  # a single pair
    assert math.isnan(pearson(x, torch.tensor([1.0, float("nan"), 2.0])))
    with pytest.raises(ValueError):
        pearson(x, torch.ones(4))


def test_a_win_that_is_entirely_length_is_a_coin_flip_once_length_is_controlled():
    # scores are exactly 0.1 · length and the policy is always longer: raw win rate 1.0; the fitted slope is 0.1, the
    # residuals are all equal (the intercept, 0), so every prompt is a tie: 0.5
    sft_len = torch.tensor([10.0, 12.0, 15.0, 20.0, 8.0, 30.0])
    pol_len = sft_len + torch.tensor([5.0, 10.0, 3.0, 20.0, 7.0, 1.0])
    sft, pol = 0.1 * sft_len, 0.1 * pol_len
    assert win_rate(pol, sft)[0] == 1.0
    rate, (low, high), slope = length_controlled_win_rate(pol, sft, pol_len, sft_len)
    assert slope == pytest.approx(0.1, rel=1e-6)
    assert rate == 0.5
    assert (low, high) == pytest.approx(wilson_interval(3.0, 6))
    assert low < 0.5 < high


def test_a_win_beyond_length_survives_length_control():
    # both policies give the same lengths (in another order) and PPO scores 1.0 above 0.1 · length: the length and
    # PPO-indicator columns are orthogonal, so the pooled slope is exactly 0.1 and every residual difference is +1.0
    sft_len = torch.tensor([10.0, 20.0, 30.0, 40.0])
    pol_len = torch.tensor([40.0, 30.0, 20.0, 10.0])
    sft, pol = 0.1 * sft_len, 0.1 * pol_len + 1.0
    # raw: 5 > 1, 4 > 2, 3 = 3 (tie), 2 < 4 -> (2 + 0.5) / 4
    assert win_rate(pol, sft)[0] == 2.5 / 4
    rate, (low, high), slope = length_controlled_win_rate(pol, sft, pol_len, sft_len)
    assert slope == pytest.approx(0.1, rel=1e-6)
    assert rate == 1.0
    assert (low, high) == pytest.approx(wilson_interval(4.0, 4))


def test_constant_lengths_leave_the_raw_win_rate():
    lengths = torch.full((4,), 16.0)
    pol, sft = torch.tensor([1.0, 0.5, 0.2, 0.0]), torch.tensor([0.0, 0.5, 0.3, -1.0])
    rate, ci, slope = length_controlled_win_rate(pol, sft, lengths, lengths)
    assert slope == 0.0
    assert (rate, ci) == win_rate(pol, sft) == (2.5 / 4, wilson_interval(2.5, 4))


def test_length_controlled_win_rate_refuses_vectors_of_different_lengths():
    with pytest.raises(ValueError):
        length_controlled_win_rate(torch.ones(3), torch.ones(3), torch.ones(3), torch.ones(2))
