"""SFT (tasks/sft.py): how demonstrations are encoded (prompt masked, EOS learned, prompt cut from the left), the step
schedule and learning rate, checkpoint selection and its state, and the logged curves."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_pipeline.models.losses import IGNORE_INDEX
from rlhf_pipeline.models.tokens import chat_prompt_ids

MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]
RESPONSE = "Mix flour and water."


def test_sft_batch_labels_learn_eos_and_mask_the_prompt(tokenizer):
    """A real row of the tiny model's tokenizer: prompt tokens carry no loss, the response's tokens and its EOS do."""
    from rlhf_pipeline.tasks.sft import collate, encode_demonstration

    row = encode_demonstration(tokenizer, MESSAGES, RESPONSE, max_length=128)
    other = encode_demonstration(tokenizer, MESSAGES, "No.", max_length=128)  # shorter: padded in the batch
    ids, mask, labels = collate([row, other], tokenizer.pad_token_id)
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    response = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]

    assert row.prompt_length == len(prompt) and not (row.prompt_truncated or row.response_truncated)
    assert ids[0, : len(prompt)].tolist() == prompt
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")  # the generation prompt precedes the response
    assert (labels[0, : len(prompt)] == IGNORE_INDEX).all()
    learned = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert learned == response + [tokenizer.eos_token_id]  # the model learns to stop
    assert row.label_tokens == len(response) + 1
    # the shorter row: its padding (pad = EOS for SmolLM2's tokenizer) is masked, its own EOS is learned once
    assert mask[1].sum() == len(other.ids) and (labels[1, len(other.ids) :] == IGNORE_INDEX).all()
    assert labels[1][labels[1] != IGNORE_INDEX].tolist()[-1] == tokenizer.eos_token_id
    assert (labels[1] == tokenizer.eos_token_id).sum() == 1


def test_an_over_long_demonstration_loses_the_start_of_its_prompt_and_keeps_eos(tokenizer):
    """Prompt + response over ``max_length``: the prompt's oldest tokens go, the response stays whole with its EOS
    (issue 10: a demonstration cut at the end teaches the model never to stop)."""
    from rlhf_pipeline.tasks.sft import encode_demonstration

    long_prompt = [{"role": "user", "content": "Tell me about bread. " * 40 + "Be brief."}]
    full_prompt = chat_prompt_ids(tokenizer, long_prompt)
    response = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(full_prompt) > 64

    row = encode_demonstration(tokenizer, long_prompt, RESPONSE, max_length=64)
    assert len(row.ids) == 64 and row.prompt_truncated and not row.response_truncated
    assert row.ids[row.prompt_length :] == response  # whole, EOS last
    assert row.ids[: row.prompt_length] == full_prompt[-row.prompt_length :]  # the latest tokens of the prompt
    assert row.prompt_length == 64 - len(response)


def test_a_response_longer_than_the_budget_keeps_its_start_and_its_eos(tokenizer):
    """A response that alone exceeds ``max_length`` minus the prompt's reserve (a quarter of it) is cut, still closed
    with EOS, and flagged (counted in ``truncated_responses``)."""
    from rlhf_pipeline.tasks.sft import MIN_PROMPT_SHARE, encode_demonstration

    text = "knead the dough and let it rise " * 30
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    row = encode_demonstration(tokenizer, MESSAGES, text, max_length=64)
    reserve = int(64 * MIN_PROMPT_SHARE)
    assert row.response_truncated and len(row.ids) == 64 and row.prompt_length == reserve
    assert row.ids[-1] == tokenizer.eos_token_id
    assert row.ids[reserve:-1] == tokens[: 64 - reserve - 1]  # the response's start
    assert row.ids[:reserve] == chat_prompt_ids(tokenizer, MESSAGES)[-reserve:]  # ends with the generation prompt
    with pytest.raises(ValueError, match="at least 2"):
        encode_demonstration(tokenizer, MESSAGES, text, max_length=1)


def test_schedule_counts_steps_like_the_trainer_and_orders_data_without_state():
    from rlhf_pipeline.tasks.sft import Schedule

    # 10 rows in micro-batches of 3 (3, 3, 3, 1), 2 per step: 2 steps an epoch; 1.5 epochs = 3 steps
    schedule = Schedule(n=10, batch_size=3, grad_accum=2, epochs=1.5)
    assert (schedule.micro_batches, schedule.steps_per_epoch, schedule.total) == (4, 2, 3)
    assert [schedule.ends_epoch(s) for s in (1, 2, 3)] == [False, True, True]  # the cut-short epoch 2 ends the run
    assert [schedule.epoch_of(s) for s in (1, 2, 3)] == [1, 1, 2]
    first, second = schedule.step_rows(0, seed=7), schedule.step_rows(1, seed=7)
    assert [len(b) for b in first] == [3, 3] and [len(b) for b in second] == [3, 1]
    assert sorted(i for b in first + second for i in b) == list(range(10))  # one epoch sees every row once
    assert schedule.step_rows(1, seed=7) == second  # a function of (seed, step): nothing to checkpoint
    assert schedule.step_rows(2, seed=7) != first  # a new permutation in epoch 2
    assert Schedule(n=4, batch_size=4, grad_accum=1, epochs=2).total == 2


def test_learning_rate_decays_on_a_cosine_to_the_min_ratio_without_warmup():
    from rlhf_pipeline.tasks.sft import lr_factor

    assert lr_factor(0, 10, 0.1) == 1.0  # no warmup: the first step runs at the peak
    assert lr_factor(5, 10, 0.1) == pytest.approx(0.55)  # half way: the middle of [0.1, 1]
    assert lr_factor(10, 10, 0.1) == pytest.approx(0.1)  # the end of the run: 10% of the peak (App. C.1)
    assert lr_factor(9, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_logged_figures_average_the_window_and_replay_from_the_history():
    from rlhf_pipeline.tasks.sft import _logged_figures

    history = [{"sft/loss": float(i), "sft/token_accuracy": i / 10, "sft/grad_norm": 10.0 * i,
                "sft/learning_rate": 1.0 / i} for i in (1, 2, 3, 4, 5)]
    assert _logged_figures(history, 1, 2, 5) is None
    assert _logged_figures(history, 2, 2, 5) == pytest.approx(
        {"sft/loss": 1.5, "sft/token_accuracy": 0.15, "sft/grad_norm": 15.0, "sft/learning_rate": 0.5})
    assert _logged_figures(history, 5, 2, 5) == pytest.approx(
        {"sft/loss": 5.0, "sft/token_accuracy": 0.5, "sft/grad_norm": 50.0, "sft/learning_rate": 0.2})
    assert _logged_figures(history[:3], 3, 1, 5)["sft/loss"] == 3.0


def test_checkpoint_selector_keeps_the_lowest_eval_loss_epoch():
    from rlhf_pipeline.tasks.sft import CheckpointSelector

    model = torch.nn.Linear(1, 1, bias=False)
    selector = CheckpointSelector()
    for epoch, (weight, loss) in enumerate([(1.0, 2.0), (2.0, 1.5), (3.0, 1.8)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        selector.consider(model, loss, epoch)
    selector.restore(model)
    assert selector.criterion == "eval_loss"
    assert selector.best_epoch == 2 and model.weight.item() == 2.0


def test_checkpoint_selector_prefers_reward_model_score():
    from rlhf_pipeline.tasks.sft import CheckpointSelector

    model = torch.nn.Linear(1, 1, bias=False)
    # the RM prefers larger weights although eval loss gets worse
    selector = CheckpointSelector(reward_model=object(), score_fn=lambda m: m.weight.item())
    for epoch, (weight, loss) in enumerate([(1.0, 1.0), (3.0, 2.0), (2.0, 0.5)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        selector.consider(model, loss, epoch)
    selector.restore(model)
    assert selector.criterion == "mean_rm_score"
    assert selector.best_epoch == 2 and model.weight.item() == 3.0


def test_checkpoint_selector_keeps_only_trainable_weights():
    """Frozen weights (a LoRA model's base) are not copied: the selector holds what training changes."""
    from rlhf_pipeline.tasks.sft import CheckpointSelector

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    selector = CheckpointSelector()
    selector.consider(model, 1.0, 1)
    assert sorted(selector.best_state) == ["1.bias", "1.weight"]


def test_checkpoint_selector_state_survives_a_checkpoint(tmp_path):
    """The JSON state and the best weights go through a real checkpoint folder (tasks/checkpoints.py) and back."""
    from rlhf_pipeline.tasks.checkpoints import latest_step, load_step, save_step
    from rlhf_pipeline.tasks.sft import CheckpointSelector

    model = torch.nn.Linear(2, 1)
    selector = CheckpointSelector()
    for epoch, (weight, loss) in enumerate([(1.0, 1.0), (2.0, 2.0)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        selector.consider(model, loss, epoch, step=3 * epoch)
    save_step(tmp_path, 6, {"best": selector.tensors(model)}, {"config_hash": "h", "selector": selector.state()},
              keep=1)

    folder, state = latest_step(tmp_path, "h")
    restored = CheckpointSelector()
    restored.load_state(state["selector"])
    template = {"best": restored.template(model)}
    load_step(folder, template)
    restored.load_tensors(template["best"])
    assert (restored.best, restored.best_epoch, restored.history) == (selector.best, 1, selector.history)
    assert restored.history[1]["step"] == 6.0
    restored.restore(model)
    assert model.weight.tolist() == [[1.0, 1.0]]  # epoch 1's weights, read back from the checkpoint
    with pytest.raises(ValueError, match="selected by eval_loss"):
        CheckpointSelector(reward_model=object()).load_state(state["selector"])


def test_token_accuracy_counts_labelled_argmax_hits():
    from rlhf_pipeline.tasks.sft import _correct_tokens

    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 0] = 1.0  # argmax 2, 1, 0 at positions 0..2
    labels = torch.tensor([[IGNORE_INDEX, 2, 1, 1]])  # position 0 -> 2 (hit), 1 -> 1 (hit), 2 -> 1 (miss)
    assert int(_correct_tokens(logits, labels)) == 2
    labels[0, 1] = IGNORE_INDEX  # a prompt token: a hit that does not count
    assert int(_correct_tokens(logits, labels)) == 1
