"""Stage 1: supervised fine-tuning on human demonstrations (InstructGPT §3.5 "Supervised fine-tuning", App. C.1).

TRL's ``SFTTrainer`` does the work on prompt-completion conversations: the loss is on the completion (response) tokens
only, and the chat template closes the response with the EOS token (``<|im_end|>`` for SmolLM2), so the model learns to
stop. The learning rate decays on a cosine to 10% of its peak with no warmup, as in the paper.

Checkpoint selection (App. C.1): the model is evaluated after every epoch; when a reward model is given (in a retrain,
the registry's ``champion`` RM), the epoch whose greedy responses to validation prompts get the highest mean RM score
is kept, else the epoch with the lowest validation loss.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from flows.config import Config
from models.loading import default_dtype, load_causal_lm, load_tokenizer, resolve_device
from tasks.common import MetricLogger, StageResult, no_log, seed_everything
from tasks.data import load_prepared


def to_conversations(frame) -> list[dict]:
    """Canonical demonstrations -> TRL prompt-completion conversations.

    Returns ``[{"prompt": [messages...], "completion": [{"role": "assistant", "content": response}]}, ...]``.
    """
    return [
        {"prompt": list(row.prompt), "completion": [{"role": "assistant", "content": row.response}]}
        for row in frame.itertuples()
    ]


def sft_training_args(config: Config, output_dir: Path, device: torch.device, has_eval: bool = True):
    """The ``trl.SFTConfig`` of a run: bf16 and gradient checkpointing only on CUDA (both make CPU training ~16x slower);
    evaluation after every epoch when there is validation data (checkpoint selection)."""
    from trl import SFTConfig

    cfg = config.sft
    on_cuda = device.type == "cuda"
    return SFTConfig(
        output_dir=str(output_dir / "trainer"),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        warmup_steps=0,
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        completion_only_loss=True,
        bf16=on_cuda,
        activation_checkpointing=on_cuda,
        use_cpu=not on_cuda,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        eval_strategy="epoch" if has_eval else "no",
        report_to="none",
        seed=config.model.seed,
        data_seed=config.model.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


@torch.no_grad()
def mean_reward_of_greedy_responses(model, tokenizer, reward_model, prompts: list[list[dict]], max_prompt_tokens: int,
                                    max_new_tokens: int, batch_size: int = 8) -> float:
    """Mean RM score of the model's greedy responses to ``prompts`` (the SFT selection criterion of App. C.1)."""
    from models.policy import sample_responses
    from models.reward_model import chat_prompt_ids

    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        queries = [chat_prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts[start : start + batch_size]]
        rollout = sample_responses(model, tokenizer, queries, max_new_tokens, do_sample=False)
        scores.append(reward_model.score(rollout.input_ids, rollout.attention_mask))
    model.train(was_training)
    return float(torch.cat(scores).mean())


class CheckpointSelector:
    """Keeps the best epoch's weights in memory: highest mean RM score when ``reward_model`` is given, else lowest
    validation loss (InstructGPT App. C.1). ``consider(model, eval_loss, epoch)`` after each epoch; ``restore(model)``
    at the end."""

    def __init__(self, reward_model=None, score_fn=None):
        self.reward_model = reward_model
        self.score_fn = score_fn
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.history: list[dict[str, float]] = []

    @property
    def criterion(self) -> str:
        return "mean_rm_score" if self.reward_model is not None else "eval_loss"

    def consider(self, model, eval_loss: float, epoch: int) -> float:
        value = self.score_fn(model) if self.reward_model is not None else -eval_loss
        self.history.append({"epoch": float(epoch), "eval_loss": eval_loss, "criterion": value})
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return value

    def restore(self, model) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def run_sft(
    config: Config,
    prepared_dir: str | Path,
    base_model_path: str | Path,
    output_dir: str | Path,
    log: MetricLogger = no_log,
    selection_reward_model: str | Path | None = None,
) -> StageResult:
    """Fine-tune the base model on the train demonstrations; save it (safetensors + tokenizer) to ``output_dir/model``.

    Args:
        config: the run's configuration (``config.sft`` and ``config.model``).
        prepared_dir: folder of the canonical datasets (``demonstrations.parquet``).
        base_model_path: transformers folder or id of the base model.
        output_dir: where the stage writes.
        log: receives ``sft/loss``, ``sft/learning_rate``, ``sft/grad_norm`` per step and ``sft/eval_loss`` (and
            ``sft/selection_rm_score``) per epoch.
        selection_reward_model: a reward-model folder; when given, the epoch is chosen by mean RM score on validation
            prompts, else by validation loss.

    Returns:
        StageResult with ``paths.model`` and metrics ``train_loss``, ``eval_loss`` (of the kept epoch),
        ``eval_perplexity``, ``selected_epoch``, ``selection`` (criterion name), ``train_examples``, ``steps``,
        ``wall_s``.

    Raises:
        FileNotFoundError: when the prepared data is missing.
        ValueError: when there are no train demonstrations.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    start = time.time()
    cfg = config.sft
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.model.seed)
    device = resolve_device(config.model.device)

    train = load_prepared(prepared_dir, "demonstrations", split="train")
    if cfg.max_examples is not None:
        train = train.sample(n=min(cfg.max_examples, len(train)), random_state=config.model.seed)
    if len(train) == 0:
        raise ValueError(f"no train demonstrations in {prepared_dir}")
    evaluation = load_prepared(prepared_dir, "demonstrations", split="validation")
    if len(evaluation) == 0:
        evaluation = load_prepared(prepared_dir, "demonstrations", split="test")
    if cfg.eval_examples is not None:
        evaluation = evaluation.head(cfg.eval_examples)

    tokenizer = load_tokenizer(base_model_path)
    tokenizer.padding_side = "right"
    model = load_causal_lm(base_model_path, device, default_dtype(device))

    selector = CheckpointSelector()
    if selection_reward_model is not None:
        from models.loading import assert_same_tokenizer
        from models.reward_model import ScalarHeadModel

        assert_same_tokenizer(tokenizer, load_tokenizer(selection_reward_model), "SFT model and selection reward model")
        rm = ScalarHeadModel.from_pretrained(selection_reward_model, device, default_dtype(device)).eval()
        prompts = load_prepared(prepared_dir, "prompts", split="validation").head(cfg.selection_prompts)
        gen_tokenizer = load_tokenizer(base_model_path)  # left padding for generation
        selector = CheckpointSelector(rm, lambda m: mean_reward_of_greedy_responses(
            m, gen_tokenizer, rm, [list(p) for p in prompts.prompt], config.ppo.max_prompt_tokens,
            config.ppo.max_new_tokens))

    class _Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            metrics = {f"sft/{k}": float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
            if metrics:
                log(metrics, state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            eval_loss = float((metrics or {}).get("eval_loss", float("nan")))
            epoch = round(state.epoch or 0)
            value = selector.consider(model, eval_loss, epoch)
            figures = {"sft/epoch_eval_loss": eval_loss}
            if selector.reward_model is not None:
                figures["sft/selection_rm_score"] = value
            log(figures, state.global_step)

    trainer = SFTTrainer(
        model=model,
        args=sft_training_args(config, output_dir, device, has_eval=len(evaluation) > 0),
        train_dataset=Dataset.from_list(to_conversations(train)),
        eval_dataset=Dataset.from_list(to_conversations(evaluation)) if len(evaluation) else None,
        processing_class=tokenizer,
        callbacks=[_Log()],
    )
    train_output = trainer.train()
    metrics: dict[str, float | str] = {
        "train_loss": float(train_output.training_loss),
        "train_examples": float(len(train)),
        "steps": float(trainer.state.global_step),
        "selection": selector.criterion,
    }
    if selector.best_epoch is not None:
        selector.restore(trainer.model)
        kept = next(h for h in selector.history if h["epoch"] == selector.best_epoch)
        metrics.update(selected_epoch=float(selector.best_epoch), eval_loss=kept["eval_loss"],
                       eval_perplexity=math.exp(min(kept["eval_loss"], 50.0)))
        if selector.reward_model is not None:
            metrics["selection_rm_score"] = selector.best

    model_dir = output_dir / "model"
    trainer.model.to(torch.float32).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(model_dir)
    metrics["wall_s"] = time.time() - start
    return StageResult("sft", paths={"model": str(model_dir)}, metrics=metrics)
