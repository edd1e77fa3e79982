"""The evaluation's verdicts (tasks/evaluate.py): the length-hack flag, the headline sentence, and the held-out
demonstrations of the alignment tax rendered as full dialogues."""

from __future__ import annotations

import pytest

from rlhf_pipeline.tasks.evaluate import (
    headline,
    heldout_dialogues,
    length_hack,
    mode_collapse,
    perplexity,
    response_diversity,
)


def metrics(**changes) -> dict:
    """An evaluation's metrics where PPO honestly beats SFT under an informative judge."""
    base = {
        "win_rate_vs_sft": 0.69, "win_rate_vs_sft_ci": [0.60, 0.76],
        "win_rate_vs_sft_length_controlled": 0.66, "win_rate_vs_sft_length_controlled_ci": [0.57, 0.74],
        "reward_per_token": 0.01,
        "mean_reward_policy": 1.2, "mean_reward_sft": 0.4, "kl_to_sft": 3.2,
        "response_length_policy": 30.0, "response_length_sft": 28.0,
        "ended_with_eos_policy": 0.97, "ended_with_eos_sft": 0.95, "num_prompts": 128.0,
        "win_rate_vs_sft_judge": 0.71, "win_rate_vs_sft_judge_ci": [0.63, 0.78],
        "mean_judge_reward_policy": 0.8, "mean_judge_reward_sft": 0.1,
        "judge_informative": 1.0, "over_optimisation": 0.0,
    }
    return base | changes


def test_length_hack_needs_a_raw_win_and_one_sign_of_length():
    assert not length_hack(metrics())  # a win that survives length control, ends properly, similar lengths
    # each of the three signs alone makes a raw win a length hack
    assert length_hack(metrics(win_rate_vs_sft_length_controlled_ci=[0.42, 0.59]))
    assert length_hack(metrics(win_rate_vs_sft_length_controlled_ci=[0.5, 0.6]))  # the lower end at 0.5 counts
    assert length_hack(metrics(ended_with_eos_policy=0.89))
    assert not length_hack(metrics(ended_with_eos_policy=0.9))
    assert length_hack(metrics(response_length_policy=28.0 * 1.3 + 0.1))
    assert not length_hack(metrics(response_length_policy=28.0 * 1.3))
    # no raw win (interval reaching 0.5): no length hack, whatever the lengths
    assert not length_hack(metrics(win_rate_vs_sft_ci=[0.5, 0.7], ended_with_eos_policy=0.1,
                                   response_length_policy=100.0, win_rate_vs_sft_length_controlled_ci=[0.2, 0.4]))
    # missing figures (an older evaluation) are no evidence
    assert not length_hack({"win_rate_vs_sft": 0.7, "win_rate_vs_sft_ci": [0.6, 0.8]})


def test_headline_ppo_beats_sft():
    assert headline(metrics()) == ("PPO beats SFT: win rate 0.71 [0.63, 0.78] under the judge, 0.69 [0.60, 0.76] "
                                   "under the training RM, at 3.2 nats of KL on 128 held-out prompts.")
    # without an informative judge the training RM leads, and the sentence says nobody checked it
    assert headline(metrics(judge_informative=0.0)) == (
        "PPO beats SFT: win rate 0.69 [0.60, 0.76] under the training RM, at 3.2 nats of KL on 128 held-out prompts "
        "(the judge carries no information).")
    no_judge = {k: v for k, v in metrics().items() if "judge" not in k}
    assert headline(no_judge).endswith("on 128 held-out prompts (no judge to check it).")


def test_headline_length_hack_says_the_win_is_length():
    m = metrics(win_rate_vs_sft=0.81, win_rate_vs_sft_ci=[0.73, 0.87], win_rate_vs_sft_length_controlled=0.48,
                win_rate_vs_sft_length_controlled_ci=[0.40, 0.57], ended_with_eos_policy=0.42,
                response_length_policy=47.8, response_length_sft=21.3)
    assert length_hack(m)
    assert headline(m) == ("PPO's win under the training RM (0.81 [0.73, 0.87]) comes from length, not quality: 42.0% "
                           "of its responses end with an end token, mean length 47.8 tokens vs 21.3 for SFT, "
                           "length-controlled win rate 0.48 [0.40, 0.57].")
    assert not headline(m).startswith("PPO beats SFT")
    # a policy just under the 90% end-token rule is not printed as "90%" (one decimal)
    short = metrics(win_rate_vs_sft_ci=[0.66, 0.81], ended_with_eos_policy=0.8984375, response_length_policy=20.1,
                    response_length_sft=35.1)
    assert length_hack(short) and "89.8% of its responses end with an end token" in headline(short)
    # the flag as run_evaluate stored it wins over a recomputation
    assert headline(metrics(length_hack=1.0)).startswith("PPO's win under the training RM (0.69 [0.60, 0.76]) comes "
                                                         "from length")


def test_headline_over_optimisation():
    m = metrics(over_optimisation=1.0, win_rate_vs_sft_judge=0.40, win_rate_vs_sft_judge_ci=[0.32, 0.49],
                kl_to_sft=6.1)
    assert headline(m) == ("Over-optimisation: the training RM prefers PPO (0.69 [0.60, 0.76]) but the judge prefers "
                           "SFT (0.40 [0.32, 0.49]) at 6.1 nats of KL: raise the KL penalty or train for fewer steps.")


def test_headline_no_gain_gives_the_reasons():
    m = metrics(win_rate_vs_sft=0.53, win_rate_vs_sft_ci=[0.41, 0.64], kl_to_sft=0.31, judge_informative=0.0,
                win_rate_vs_sft_judge=0.55, win_rate_vs_sft_judge_ci=[0.43, 0.66], over_optimisation=0.0)
    assert headline(m) == ("No measurable gain over SFT: the win rate under the training RM, 0.53 [0.41, 0.64] on "
                           "128 held-out prompts, includes 0.5; the policy barely moved (KL 0.31 nats): train longer "
                           "or with a larger learning rate; the judge carries no information.")
    # an informative judge that does not confirm the training RM's win leads, and the RM's figure is given beside it
    m = metrics(win_rate_vs_sft_judge=0.45, win_rate_vs_sft_judge_ci=[0.37, 0.49])
    assert headline(m) == ("No measurable gain over SFT: the win rate under the judge, 0.45 [0.37, 0.49] on 128 "
                           "held-out prompts, lies below 0.5 (SFT is better), while the training RM gives 0.69 "
                           "[0.60, 0.76].")
    # no judge at all, and a policy that moved: the interval is the only reason
    no_judge = {k: v for k, v in metrics(win_rate_vs_sft=0.53, win_rate_vs_sft_ci=[0.45, 0.62]).items()
                if "judge" not in k}
    assert headline(no_judge) == ("No measurable gain over SFT: the win rate under the training RM, 0.53 [0.45, 0.62] "
                                  "on 128 held-out prompts, includes 0.5.")


@pytest.fixture(scope="module")
def prepared_demonstrations(tmp_path_factory):
    from rlhf_pipeline.tasks.datasets import frame_from_records, write_parquet

    folder = tmp_path_factory.mktemp("prepared")
    rows = [{"id": f"d{i}", "prompt": [{"role": "user", "content": f"question {i}?"}], "response": f"answer {i}.",
             "split": split, "source": "test", "source_row": i}
            for i, split in enumerate(["train", "test", "validation", "test", "test"])]
    write_parquet("demonstrations", frame_from_records("demonstrations", rows), folder / "demonstrations.parquet")
    return folder


def test_heldout_dialogues_are_test_demonstrations_rendered_whole(prepared_demonstrations, tokenizer):
    texts = heldout_dialogues(prepared_demonstrations, tokenizer, limit=2)
    assert texts == [tokenizer.apply_chat_template([{"role": "user", "content": f"question {i}?"},
                                                    {"role": "assistant", "content": f"answer {i}."}], tokenize=False)
                     for i in (1, 3)]  # the test split only, at most `limit`, in source order
    assert all("answer" in t and "question" in t for t in texts)
    assert len(heldout_dialogues(prepared_demonstrations, tokenizer, limit=32)) == 3


def test_perplexity_of_the_heldout_dialogues_is_above_one(prepared_demonstrations, tokenizer, tiny_model_path):
    import torch

    from rlhf_pipeline.models.loading import load_causal_lm

    model = load_causal_lm(tiny_model_path, torch.device("cpu")).eval()
    texts = heldout_dialogues(prepared_demonstrations, tokenizer, limit=32)
    ppl = perplexity(model, tokenizer, texts, max_tokens=16, batch_size=2)
    assert ppl > 1.0 and ppl == ppl


def test_response_diversity_counts_whole_texts():
    texts = ["I don't have an answer."] * 3 + ["Sure.", "", "Sure."]
    assert response_diversity(texts) == (3 / 6, 3 / 6, "I don't have an answer.")
    assert response_diversity(["a", "b"]) == (1.0, 0.5, "a")  # a tie: the first sampled
    distinct, share, text = response_diversity([])
    assert distinct != distinct and share != share and text == ""


def test_mode_collapse_is_one_reply_winning_and_the_headline_says_so():
    # the 40-minute scaled demo run of 2026-12-05: 250 of 256 responses were one refusal
    m = metrics(win_rate_vs_sft=1.0, win_rate_vs_sft_ci=[0.985, 1.0], kl_to_sft=19.49,
                distinct_responses_policy=6 / 256, distinct_responses_sft=1.0,
                most_common_response_share_policy=250 / 256, most_common_response_share_sft=1 / 256,
                most_common_response_policy="I don't have an answer.")
    assert mode_collapse(m) and not length_hack(m)
    assert headline(m) == ("PPO's win under the training RM (1.00 [0.98, 1.00]) comes from one reply repeated (mode "
                           "collapse): 97.7% of its responses are \"I don't have an answer.\", 2.3% are distinct (SFT: "
                           "100.0%), at 19.5 nats of KL: the reward model rewards that reply; raise the KL penalty or "
                           "train for fewer steps.")
    # the 20-step demo: 16 of 128 responses empty (12.5%) is under the 25% rule; no win, or SFT as repetitive: no flag
    assert not mode_collapse(metrics(most_common_response_share_policy=16 / 128, most_common_response_share_sft=0.01))
    assert not mode_collapse(metrics(most_common_response_share_policy=0.5, win_rate_vs_sft_ci=[0.45, 0.6]))
    assert not mode_collapse(metrics(most_common_response_share_policy=0.5, most_common_response_share_sft=0.5))
    assert not mode_collapse(metrics())  # no figure, no evidence
    assert headline(metrics()).startswith("PPO beats SFT")
