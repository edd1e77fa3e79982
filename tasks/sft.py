"""Stage 1: supervised fine-tuning on human demonstrations (InstructGPT §3.5 "Supervised fine-tuning", App. C.1).

TRL's ``SFTTrainer`` does the work on prompt-completion conversations: the loss is on the completion (response) tokens
only, and the chat template closes the response with the EOS token (``<|im_end|>`` for SmolLM2), so the model learns to
stop. The learning rate decays on a cosine to 10% of its peak with no warmup, as in the paper.

Checkpoint selection (App. C.1): the model is evaluated after every epoch; when a reward model is given (in a retrain,
the registry's ``champion`` RM), the epoch whose greedy responses to validation prompts get the highest mean RM score
is kept, else the epoch with the lowest validation loss.

Checkpoints (``sft.checkpoint_every`` > 0) are the Trainer's own (``output_dir/trainer/checkpoint-N``: model, optimizer,
scheduler, RNG states, trainer state with the data position) plus the checkpoint selector's state
(``selection.json`` and the best epoch's weights in ``selection-best.safetensors``); a rerun with the same configuration,
inputs and ``output_dir`` resumes from the newest and ends with the same model and metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from pydantic import Field

from rlhf_pipeline.models.loading import (
    assert_same_tokenizer,
    default_dtype,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
)
from rlhf_pipeline.models.policy import sample_responses
from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import chat_prompt_ids
from rlhf_pipeline.tasks.datasets import load_prepared
from rlhf_pipeline.tasks.stage import (
    MetricLogger,
    ModelConfig,
    Section,
    StageDir,
    StageResult,
    no_log,
    numeric_metrics,
    section_hash,
    seed_everything,
)


class SFTConfig(Section):
    """Supervised fine-tuning (InstructGPT App. C.1)."""

    max_examples: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decay to 10% of the peak LR
    max_length: int = Field(256, ge=8)
    eval_examples: int | None = Field(16, ge=1)
    logging_steps: int = Field(1, ge=1)
    # checkpoint selection (App. C.1): by mean RM score on validation prompts when this reward model is available
    # ("champion" = the registry's champion RM, a folder, or null), else by validation loss
    selection_reward_model: str | None = Field("champion", min_length=1)
    selection_prompts: int = Field(16, ge=1)
    # the greedy responses scored for the selection: prompt tokens kept (from the left) and new tokens generated
    selection_max_prompt_tokens: int = Field(128, ge=1)
    selection_max_new_tokens: int = Field(32, ge=1)
    # optimizer steps between resumable checkpoints in output_dir/sft/trainer/checkpoint-N (0: none); a rerun with the
    # same configuration and output_dir resumes from the newest (model, optimizer, scheduler, RNG, data position and
    # the checkpoint selector's best epoch)
    checkpoint_every: int = Field(0, ge=0)


def to_conversations(frame) -> list[dict]:
    """Canonical demonstrations -> TRL prompt-completion conversations.

    Returns ``[{"prompt": [messages...], "completion": [{"role": "assistant", "content": response}]}, ...]``.
    """
    return [
        {"prompt": list(row.prompt), "completion": [{"role": "assistant", "content": row.response}]}
        for row in frame.itertuples()
    ]


def sft_training_args(cfg: SFTConfig, seed: int, output_dir: Path, device: torch.device):
    """The ``trl.SFTConfig`` of a run: bf16 and gradient checkpointing only on CUDA (both make CPU training ~16x slower);
    a checkpoint in ``output_dir/trainer/checkpoint-N`` every ``sft.checkpoint_every`` optimizer steps and after the
    last one (the last two are kept) when that is > 0.

    ``eval_strategy`` is ``"no"`` even with validation data: :func:`run_sft` evaluates
    at every epoch's last step itself, before that step's checkpoint is written, so a checkpoint taken at an epoch
    boundary already holds that epoch's evaluation (the Trainer's ``"epoch"`` strategy evaluates after the save, and a
    run resumed from such a checkpoint would never evaluate that epoch).
    """
    from trl import SFTConfig

    on_cuda = device.type == "cuda"
    checkpoints = cfg.checkpoint_every > 0
    return SFTConfig(
        output_dir=str(StageDir(output_dir).trainer),
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
        save_strategy="steps" if checkpoints else "no",
        save_steps=cfg.checkpoint_every or 500,
        save_total_limit=2 if checkpoints else None,
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


@torch.no_grad()
def mean_reward_of_greedy_responses(model, tokenizer, reward_model, prompts: list[list[dict]], max_prompt_tokens: int,
                                    max_new_tokens: int, batch_size: int = 8) -> float:
    """Mean RM score of the model's greedy responses to ``prompts`` (the SFT selection criterion of App. C.1)."""
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        queries = [chat_prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts[start : start + batch_size]]
        rollout = sample_responses(model, tokenizer, queries, max_new_tokens, do_sample=False)
        scores.append(reward_model.score(rollout.input_ids, rollout.attention_mask))
    model.train(was_training)
    return float(torch.cat(scores).mean())


SELECTION_STATE = "selection.json"
SELECTION_WEIGHTS = "selection-best.safetensors"


class CheckpointSelector:
    """Keeps the best epoch's weights in memory: highest mean RM score when ``reward_model`` is given, else lowest
    validation loss (InstructGPT App. C.1). ``consider(model, eval_loss, epoch)`` after each epoch; ``restore(model)``
    at the end. ``save(folder)`` and ``load(folder)`` carry its state across a resume."""

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

    def consider(self, model, eval_loss: float, epoch: int, step: int | None = None) -> float:
        """Record one epoch's evaluation (``step``: the optimizer step it followed) and keep a CPU copy of the
        weights when it is the best so far. Returns the criterion value (mean RM score, or ``-eval_loss``)."""
        value = self.score_fn(model) if self.reward_model is not None else -eval_loss
        entry = {"epoch": float(epoch), "eval_loss": eval_loss, "criterion": value}
        if step is not None:
            entry["step"] = float(step)
        self.history.append(entry)
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return value

    def restore(self, model) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """Write the state to ``folder``: the best weights to ``selection-best.safetensors`` (when there are any),
        then ``selection.json`` (history, best, best epoch, criterion and ``extra``). Each file is written under a
        temporary name and renamed, and the JSON comes last, so its presence marks a complete state."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if self.best_state is not None:
            tmp = folder / f".{SELECTION_WEIGHTS}.tmp"
            save_file({k: v.contiguous() for k, v in self.best_state.items()}, str(tmp))
            os.replace(tmp, folder / SELECTION_WEIGHTS)
        payload = {"criterion": self.criterion, "best": self.best, "best_epoch": self.best_epoch,
                   "history": self.history, "has_weights": self.best_state is not None, **(extra or {})}
        tmp = folder / f".{SELECTION_STATE}.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, folder / SELECTION_STATE)

    def load(self, folder: str | Path) -> dict:
        """Restore the state written by :meth:`save` (the best weights onto the CPU). Returns the whole
        ``selection.json`` payload.

        Raises:
            FileNotFoundError: when ``folder`` has no complete state.
            ValueError: when it was written under the other criterion.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        payload = json.loads((folder / SELECTION_STATE).read_text())
        if payload["criterion"] != self.criterion:
            raise ValueError(f"{folder} was selected by {payload['criterion']}, this run selects by {self.criterion}")
        self.history, self.best, self.best_epoch = payload["history"], payload["best"], payload["best_epoch"]
        self.best_state = load_file(str(folder / SELECTION_WEIGHTS)) if payload["has_weights"] else None
        return payload


def _checkpoint_step(folder: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def latest_sft_checkpoint(trainer_dir: str | Path, config_hash: str) -> Path | None:
    """The newest complete SFT checkpoint of this configuration in ``trainer_dir`` (``checkpoint-N`` folders), or
    ``None``.

    Complete means the Trainer's files and the selector's ``selection.json`` are there (it is written last, so a run
    killed between the two leaves an incomplete folder). Incomplete folders and those of another configuration are
    removed, so the Trainer's rotation of the last two never mixes them with this run's.
    """
    found = None
    folders = sorted((p for p in Path(trainer_dir).glob("checkpoint-*") if _checkpoint_step(p) >= 0),
                     key=_checkpoint_step, reverse=True)
    for folder in folders:
        try:
            usable = (folder / "trainer_state.json").is_file() and json.loads(
                (folder / SELECTION_STATE).read_text()).get("config_hash") == config_hash
        except (OSError, ValueError):
            usable = False
        if usable and found is None:
            found = folder
        elif not usable:
            shutil.rmtree(folder, ignore_errors=True)
    return found


def _mean_train_loss(log_history: list[dict]) -> float:
    """Mean per-step training loss from the Trainer's ``log_history``: each ``loss`` entry is the mean over the steps
    since the previous one, so entries are weighted by their step counts (this equals the Trainer's own
    ``training_loss``, which after a resume only covers the steps of the last ``train()`` call)."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += float(entry["loss"]) * (int(entry["step"]) - last)
            last = int(entry["step"])
    return total / last if last else float("nan")


def _train_log_figures(logs: dict) -> dict[str, float]:
    """The ``sft/*`` figures of one Trainer log entry (numbers only, without its epoch and step)."""
    return {f"sft/{k}": v for k, v in numeric_metrics(logs).items() if k not in ("epoch", "step")}


def run_sft(
    cfg: SFTConfig,
    model_cfg: ModelConfig,
    prepared_dir: str | Path,
    base_model_path: str | Path,
    output_dir: str | Path,
    log: MetricLogger = no_log,
    selection_reward_model: str | Path | None = None,
) -> StageResult:
    """Fine-tune the base model on the train demonstrations; save it (safetensors + tokenizer) to ``output_dir/model``.

    Args:
        cfg: the ``sft`` section.
        model_cfg: the ``model`` section (seed, device).
        prepared_dir: folder of the canonical datasets (``demonstrations.parquet``).
        base_model_path: transformers folder or id of the base model.
        output_dir: where the stage writes.
        log: receives ``sft/loss``, ``sft/learning_rate``, ``sft/grad_norm`` per step and ``sft/eval_loss`` (and
            ``sft/selection_rm_score``) per epoch.
        selection_reward_model: a reward-model folder; when given, the epoch is chosen by mean RM score on validation
            prompts, else by validation loss.

    Returns:
        StageResult with ``paths.model`` and metrics ``train_loss`` (mean per-step loss over the whole run),
        ``eval_loss`` (of the kept epoch), ``eval_perplexity``, ``selected_epoch``, ``selection`` (criterion name),
        ``train_examples``, ``steps`` (optimizer steps), ``resumed_from_step`` (0 for a fresh run), ``wall_s``.

    Checkpoints (``sft.checkpoint_every`` > 0) go to ``output_dir/trainer/checkpoint-N``; a later call with the same
    configuration, inputs and ``output_dir`` resumes from the newest complete one (see :func:`latest_sft_checkpoint`)
    and ends with the same model and metrics as an uninterrupted run on CPU. A checkpoint taken after the last step
    trains nothing more but still restores the selected epoch, writes the model and reports the same metrics.

    Raises:
        FileNotFoundError: when the prepared data is missing.
        ValueError: when there are no train demonstrations.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    start = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed = model_cfg.seed
    seed_everything(seed)
    device = resolve_device(model_cfg.device)

    train = load_prepared(prepared_dir, "demonstrations", split="train")
    if cfg.max_examples is not None:
        train = train.sample(n=min(cfg.max_examples, len(train)), random_state=seed)
    if len(train) == 0:
        raise ValueError(f"no train demonstrations in {prepared_dir}")
    evaluation = load_prepared(prepared_dir, "demonstrations", split="validation")
    if len(evaluation) == 0:
        evaluation = load_prepared(prepared_dir, "demonstrations", split="test")
    if cfg.eval_examples is not None:
        evaluation = evaluation.head(cfg.eval_examples)
    has_eval = len(evaluation) > 0

    # a complete checkpoint of the same configuration and inputs in output_dir is resumed (sft.checkpoint_every > 0)
    config_hash = (f"{section_hash(cfg)}:{seed}:{base_model_path}:{selection_reward_model}:{len(train)}:"
                   f"{len(evaluation)}")
    trainer_dir = StageDir(output_dir).trainer
    resume = latest_sft_checkpoint(trainer_dir, config_hash) if cfg.checkpoint_every > 0 else None
    resume_state = json.loads((resume / "trainer_state.json").read_text()) if resume else None
    finished = resume_state is not None and resume_state["global_step"] >= resume_state["max_steps"]

    tokenizer = load_tokenizer(base_model_path)
    tokenizer.padding_side = "right"
    # a checkpoint after the last step holds the final weights: nothing is left to train
    model = load_causal_lm(resume if finished else base_model_path, device, default_dtype(device))

    selector = CheckpointSelector()
    if selection_reward_model is not None:
        assert_same_tokenizer(tokenizer, load_tokenizer(selection_reward_model), "SFT model and selection reward model")
        rm = ScalarHeadModel.from_pretrained(selection_reward_model, device, default_dtype(device)).eval()
        prompts = load_prepared(prepared_dir, "prompts", split="validation").head(cfg.selection_prompts)
        gen_tokenizer = load_tokenizer(base_model_path)  # left padding for generation
        selector = CheckpointSelector(rm, lambda m: mean_reward_of_greedy_responses(
            m, gen_tokenizer, rm, [list(p) for p in prompts.prompt], cfg.selection_max_prompt_tokens,
            cfg.selection_max_new_tokens))

    resumed_from = 0
    if resume is not None:
        selector.load(resume)
        resumed_from = int(resume_state["global_step"])
        # the resumed run's MLflow curves are complete: replay what the checkpoint had logged
        for entry in resume_state["log_history"]:
            figures = _train_log_figures(entry)
            if figures:
                log(figures, int(entry["step"]))
        for h in selector.history:
            figures = {"sft/epoch_eval_loss": h["eval_loss"]}
            if selector.reward_model is not None:
                figures["sft/selection_rm_score"] = h["criterion"]
            log(figures, int(h.get("step", 0)))

    class _Log(TrainerCallback):
        """Forwards the Trainer's logs; evaluates at every epoch's last step, before that step's checkpoint; logs every
        checkpoint step and the last (the mean train loss is read from the logs); saves the selector's state into
        each checkpoint."""

        def on_step_end(self, args, state, control, **kwargs):
            at_epoch_end = state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-9
            last = state.global_step >= state.max_steps
            if has_eval and (at_epoch_end or last):
                control.should_evaluate = True
            if control.should_save or last:
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_loss" in logs:  # the Trainer's covers only this call's steps after a resume
                logs["train_loss"] = _mean_train_loss(state.log_history)
            metrics = _train_log_figures(logs)
            if metrics:
                log(metrics, state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            eval_loss = float((metrics or {}).get("eval_loss", float("nan")))
            epoch = round(state.epoch or 0)
            value = selector.consider(model, eval_loss, epoch, state.global_step)
            figures = {"sft/epoch_eval_loss": eval_loss}
            if selector.reward_model is not None:
                figures["sft/selection_rm_score"] = value
            log(figures, state.global_step)

        def on_save(self, args, state, control, **kwargs):
            selector.save(Path(args.output_dir) / f"checkpoint-{state.global_step}", {"config_hash": config_hash})

    if finished:
        log_history, steps = resume_state["log_history"], int(resume_state["global_step"])
        log({"sft/train_loss": _mean_train_loss(log_history)}, steps)
    else:
        trainer = SFTTrainer(
            model=model,
            args=sft_training_args(cfg, seed, output_dir, device),
            train_dataset=Dataset.from_list(to_conversations(train)),
            eval_dataset=Dataset.from_list(to_conversations(evaluation)) if has_eval else None,
            processing_class=tokenizer,
            callbacks=[_Log()],
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        model, log_history, steps = trainer.model, trainer.state.log_history, trainer.state.global_step
    metrics: dict[str, float | str] = {
        "train_loss": _mean_train_loss(log_history),
        "train_examples": float(len(train)),
        "steps": float(steps),
        "resumed_from_step": float(resumed_from),
        "selection": selector.criterion,
    }
    if selector.best_epoch is not None:
        selector.restore(model)
        kept = next(h for h in selector.history if h["epoch"] == selector.best_epoch)
        metrics.update(selected_epoch=float(selector.best_epoch), eval_loss=kept["eval_loss"],
                       eval_perplexity=math.exp(min(kept["eval_loss"], 50.0)))
        if selector.reward_model is not None:
            metrics["selection_rm_score"] = selector.best

    model_dir = StageDir(output_dir).model
    model.to(torch.float32).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(model_dir)
    metrics["wall_s"] = time.time() - start
    return StageResult("sft", paths={"model": str(model_dir)}, metrics=metrics)
