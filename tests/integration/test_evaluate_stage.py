"""The evaluation stage on the real held-out prompts with the tiny model."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration


def test_a_policy_equal_to_sft_ties_every_prompt_at_zero_kl(prepared_data, tiny_model_path, random_rm, tmp_path):
    """The policy *is* the SFT model: batch b samples from the same seeded stream for both, so every response is the
    same, every comparison a tie (win rate exactly 0.5) and the KL, from the log-probabilities generate gave while
    sampling against an SFT forward pass, is 0 up to float rounding. The prompts are batched by length (7 prompts in
    batches of 3, the last one short) and the samples come back in prompt order."""
    from rlhf_pipeline.flows.config import load_config
    from rlhf_pipeline.models.loading import load_tokenizer
    from rlhf_pipeline.tasks.evaluate import held_out_queries, run_evaluate

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke", ["evaluate.num_prompts=7", "evaluate.batch_size=3"])
    result = run_evaluate(config.evaluate, config.model, config.ppo, prepared_data, tiny_model_path, tiny_model_path,
                          random_rm, tmp_path)
    m = result.metrics
    assert m["num_prompts"] == 7.0
    assert m["win_rate_vs_sft"] == 0.5 and m["mean_reward_policy"] == pytest.approx(m["mean_reward_sft"], abs=1e-6)
    assert abs(m["kl_to_sft"]) < 1e-3
    assert m["response_length_policy"] == m["response_length_sft"]
    assert m["distinct_responses_policy"] == m["distinct_responses_sft"] > 0
    assert m["most_common_response_share_policy"] == m["most_common_response_share_sft"] >= 1 / 7
    assert m["mode_collapse"] == 0.0 and m["length_hack"] == 0.0  # a tie is no win to explain
    samples = [json.loads(line) for line in open(result.paths["samples"])]
    prompts, _, _ = held_out_queries(config.evaluate, config.model.seed, prepared_data, load_tokenizer(tiny_model_path))
    assert [s["id"] for s in samples] == list(prompts.id)
    assert [s["sft_response"] for s in samples] == [s["policy_response"] for s in samples]
