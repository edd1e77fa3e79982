"""Stage 1: supervised fine-tuning on human demonstrations (InstructGPT §3.5 "Supervised fine-tuning", App. C.1).

TRL's ``SFTTrainer`` does the work on prompt-completion conversations: the loss is on the completion (response) tokens
only, and the chat template closes the response with the EOS token (``<|im_end|>`` for SmolLM2), so the model learns to
stop. The learning rate decays on a cosine to 10% of its peak with no warmup, as in the paper.
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


def sft_training_args(config: Config, output_dir: Path, device: torch.device, n_train: int):
    """The ``trl.SFTConfig`` of a run: bf16 and gradient checkpointing only on CUDA (both make CPU training ~16x slower)."""
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
        eval_strategy="no",
        report_to="none",
        seed=config.model.seed,
        data_seed=config.model.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def run_sft(
    config: Config,
    prepared_dir: str | Path,
    base_model_path: str | Path,
    output_dir: str | Path,
    log: MetricLogger = no_log,
) -> StageResult:
    """Fine-tune the base model on the train demonstrations; save it (safetensors + tokenizer) to ``output_dir/model``.

    Args:
        config: the run's configuration (``config.sft`` and ``config.model``).
        prepared_dir: folder of the canonical datasets (``demonstrations.parquet``).
        base_model_path: transformers folder or id of the base model.
        output_dir: where the stage writes.
        log: receives ``sft/loss``, ``sft/learning_rate``, ``sft/grad_norm`` per step.

    Returns:
        StageResult with ``paths.model`` and metrics ``train_loss``, ``eval_loss``, ``eval_perplexity``,
        ``train_examples``, ``steps``, ``wall_s``.

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

    class _Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            metrics = {f"sft/{k}": float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
            if metrics:
                log(metrics, state.global_step)

    trainer = SFTTrainer(
        model=model,
        args=sft_training_args(config, output_dir, device, len(train)),
        train_dataset=Dataset.from_list(to_conversations(train)),
        eval_dataset=Dataset.from_list(to_conversations(evaluation)) if len(evaluation) else None,
        processing_class=tokenizer,
        callbacks=[_Log()],
    )
    train_output = trainer.train()
    metrics: dict[str, float] = {
        "train_loss": float(train_output.training_loss),
        "train_examples": float(len(train)),
        "steps": float(trainer.state.global_step),
    }
    if len(evaluation):
        eval_loss = float(trainer.evaluate()["eval_loss"])
        metrics.update(eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50.0)))
        log({"sft/eval_loss": eval_loss}, trainer.state.global_step)

    model_dir = output_dir / "model"
    trainer.model.to(torch.float32).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(model_dir)
    metrics["wall_s"] = time.time() - start
    return StageResult("sft", paths={"model": str(model_dir)}, metrics=metrics)
