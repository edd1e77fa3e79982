"""SFT (tasks/sft.py): labels and EOS of a batch, checkpoint selection, checkpoints and the mean train loss."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.models.loading import load_causal_lm
from rlhf_pipeline.models.tokens import chat_prompt_ids

CPU = torch.device("cpu")


MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


def test_sft_batch_labels_learn_eos_and_mask_the_prompt(tiny_model_path, tokenizer, tmp_path):
    """The SFT trainer's batch: the response's EOS is a label, prompt tokens carry no loss (-100)."""
    import pandas as pd
    from datasets import Dataset
    from trl import SFTTrainer

    from rlhf_pipeline.flows.config import Config
    from rlhf_pipeline.tasks.sft import SFTConfig, sft_training_args, to_conversations
    from rlhf_pipeline.tasks.validate import DataConfig, SourceConfig

    frame = pd.DataFrame({"prompt": [MESSAGES], "response": ["Mix flour and water."]})
    config = Config(data=DataConfig(comparisons=[SourceConfig(name="c")], demonstrations=[SourceConfig(name="d")]),
                    sft=SFTConfig(batch_size=1, max_length=128))
    trainer = SFTTrainer(
        model=load_causal_lm(tiny_model_path, CPU),
        args=sft_training_args(config.sft, config.model.seed, tmp_path, CPU),
        train_dataset=Dataset.from_list(to_conversations(frame)),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    prompt_len = len(chat_prompt_ids(tokenizer, MESSAGES))
    assert (labels[:prompt_len] == -100).all()
    learned = labels[labels != -100].tolist()
    assert tokenizer.eos_token_id in learned
    response = tokenizer("Mix flour and water.", add_special_tokens=False)["input_ids"]
    assert learned[: len(response)] == response
    assert ids[:prompt_len].tolist() == chat_prompt_ids(tokenizer, MESSAGES)


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


def test_checkpoint_selector_state_survives_save_and_load(tmp_path):
    from rlhf_pipeline.tasks.sft import CheckpointSelector

    model = torch.nn.Linear(2, 1)
    selector = CheckpointSelector()
    for epoch, (weight, loss) in enumerate([(1.0, 1.0), (2.0, 2.0)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        selector.consider(model, loss, epoch, step=3 * epoch)
    selector.save(tmp_path, {"config_hash": "h"})

    restored = CheckpointSelector()
    assert restored.load(tmp_path)["config_hash"] == "h"
    assert (restored.best, restored.best_epoch, restored.history) == (selector.best, 1, selector.history)
    assert restored.history[1]["step"] == 6.0
    restored.restore(model)
    assert model.weight.tolist() == [[1.0, 1.0]]  # epoch 1's weights, read back from the file
    with pytest.raises(ValueError, match="selected by eval_loss"):
        CheckpointSelector(reward_model=object()).load(tmp_path)


def test_latest_sft_checkpoint_skips_torn_and_foreign_folders(tmp_path):
    from rlhf_pipeline.tasks.sft import CheckpointSelector, latest_sft_checkpoint

    def folder(step: int, config_hash: str | None, trainer_state: bool = True):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if trainer_state:
            (path / "trainer_state.json").write_text("{}")
        if config_hash is not None:
            CheckpointSelector().save(path, {"config_hash": config_hash})
        return path

    good = folder(2, "h")
    folder(10, "h", trainer_state=False)  # only the selector's file: not a Trainer checkpoint
    folder(12, "other")  # another configuration
    folder(14, None)  # killed between the Trainer's files and the selector's
    older = folder(1, "h")
    assert latest_sft_checkpoint(tmp_path, "h") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [older.name, good.name]  # unusable folders removed
    assert latest_sft_checkpoint(tmp_path / "missing", "h") is None


def test_mean_train_loss_weights_log_entries_by_their_steps():
    from rlhf_pipeline.tasks.sft import _mean_train_loss

    history = [{"loss": 4.0, "step": 1}, {"eval_loss": 9.0, "step": 1}, {"loss": 1.0, "step": 4},
               {"train_loss": 0.0, "step": 4}]
    assert _mean_train_loss(history) == pytest.approx((4.0 + 3 * 1.0) / 4)
