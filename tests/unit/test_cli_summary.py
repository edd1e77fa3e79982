"""`rlhf run`'s closing summary (flows/cli.py): the stage table shows an interval beside its figure, and the
evaluation's headline sentence is printed after the table."""

from __future__ import annotations

from rlhf_pipeline.flows.cli import _console, _print_summary
from rlhf_pipeline.flows.summary import Summary

HEADLINE = "PPO beats SFT: win rate 0.71 [0.63, 0.78] under the judge, at 3.2 nats of KL on 128 held-out prompts."


def test_the_summary_prints_the_headline_and_intervals_beside_their_figures(tmp_path):
    summary = Summary(tmp_path / "summary.json")
    summary.stage("evaluate", "completed", "run1", {
        "win_rate_vs_sft": 0.6875, "win_rate_vs_sft_ci": [0.6, 0.76], "win_rate_vs_sft_length_controlled": 0.66,
        "win_rate_vs_sft_length_controlled_ci": [0.57, 0.74], "ended_with_eos_policy": 0.97, "kl_to_sft": 3.2,
        "ppl_policy_heldout": 9.25, "headline": HEADLINE, "wall_s": 12.0})
    summary.update(tracking_uri="sqlite:////tmp/mlflow.db", mlflow_parent_run_id="p", prefect_flow_run_id="f")
    console = _console()
    console.width = 400  # one table row per line: the figures are read whole
    with console.capture() as captured:
        _print_summary(console, summary.data | {"data": {"version": "v"}}, tmp_path, 60.0)
    text = captured.get()
    assert "win_rate_vs_sft=0.6875 [0.600, 0.760]" in text
    assert "win_rate_vs_sft_length_controlled=0.66 [0.570, 0.740]" in text
    assert "win_rate_vs_sft_ci" not in text  # shown beside its figure, not as a figure of its own
    assert "ended_with_eos_policy=0.97" in text and "ppl_policy_heldout=9.25" in text
    assert f"result: {HEADLINE}" in text
    assert text.index("evaluate") < text.index("result: ") < text.index("summary: ")
