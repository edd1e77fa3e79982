"""Stage 2: the reward model, trained on ranked comparisons (InstructGPT §3.5 "Reward modeling", App. C.2).

The RM starts from the SFT model with its LM head replaced by a scalar head and is trained with the ranking loss
(:func:`models.losses.ranking_loss`) over all C(K,2) pairs of each prompt. Three modes (``reward.mode``):

- ``full``: fine-tune backbone and head (the paper; the GPU default).
- ``top_layers``: fine-tune only the top ``reward.top_layers`` transformer blocks, the final norm and the head.
- ``head``: freeze the backbone, read its features once, and fit the linear head by L2-regularised ranking loss (a
  logistic regression on feature differences, solved with L-BFGS). On 2 CPU cores this buys the most accuracy per
  minute (measured in the design: ~64% vs ~54% for fine-tuning in the same time).

What a head reads is set by ``reward.depth`` (the share of the blocks kept) and ``reward.pooling`` (the last real
token's hidden state, as in the paper, or the mean over the response's tokens); the judge's by ``reward.judge_depth``
and ``reward.judge_pooling``. The defaults were measured on the demo's data and model (SmolLM2-135M, frozen features,
a linear head, 363 held-out pairs): the response mean after 20 of 30 blocks reached 0.66 with 300 training pairs and
0.68 with 700, the paper's last token after all 30 blocks 0.59 and 0.63. The judge reads the last token after 12
blocks (0.61 from the 205 validation pairs): other blocks, another pooling and other data than the RM.

After training a bias is set so that the mean score of the SFT demonstrations is 0 (App. C.2), stored with the model.
Held-out accuracy is reported with a 95% Wilson interval next to the trivial baseline "the shorter reply wins".

The fine-tuning modes write resumable checkpoints when ``reward.checkpoint_every`` > 0
(``output_dir/checkpoints/{model,judge}/step-NNNNNN``); a rerun with the same configuration, inputs and ``output_dir``
resumes from the newest and ends with the same models and metrics as an uninterrupted run.

In ``full`` mode ``reward.lora.r > 0`` trains LoRA adapters and the whole head instead of every weight; the saved model
has the adapters merged. On N workers (:mod:`rlhf_pipeline.models.distributed`) the fine-tuning modes split each step's
prompts over the workers (the models sharded with FSDP2), and the head mode extracts features data-parallel; every
worker then holds the same features, so the head fit is the single-process one.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoConfig

from rlhf_pipeline.models import distributed
from rlhf_pipeline.models.distributed import Engine
from rlhf_pipeline.models.loading import load_tokenizer, resolve_device
from rlhf_pipeline.models.lora import add_lora
from rlhf_pipeline.models.losses import ranking_accuracy, ranking_loss
from rlhf_pipeline.models.reward_model import ScalarHeadModel, score_texts
from rlhf_pipeline.models.tokens import encode_pair, pad_pairs
from rlhf_pipeline.tasks.checkpoints import (
    latest_step,
    load_step,
    restore_training_state,
    save_step,
    step_seed,
    training_state,
)
from rlhf_pipeline.tasks.datasets import load_prepared
from rlhf_pipeline.tasks.progress import progress
from rlhf_pipeline.tasks.stage import (
    LoraConfig,
    MetricLogger,
    ModelConfig,
    Section,
    StageDir,
    StageResult,
    no_log,
    section_hash,
    seed_everything,
)
from rlhf_pipeline.tasks.statistics import wilson_interval


class RewardConfig(Section):
    """Reward model training (InstructGPT §3.5, App. C.2)."""

    mode: Literal["head", "top_layers", "full"] = "head"
    top_layers: int = Field(6, ge=1)
    max_train_pairs: int | None = Field(300, ge=1)
    max_eval_pairs: int | None = Field(300, ge=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    # ridge strengths tried by 5-fold cross-validation in the head-only mode (logistic regression on frozen features)
    head_l2_candidates: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [10.0, 100.0, 1000.0, 10000.0], min_length=1)
    max_length: int = Field(384, ge=8)
    normalize: bool = True
    # what the RM's head reads: the hidden states after the first `depth` share of the blocks (1.0: all of them, the
    # paper), at the last token (the paper) or averaged over the response
    depth: float = Field(0.67, gt=0, le=1)
    pooling: Literal["last", "mean"] = "mean"
    # the judge RM: trained like the RM on a split the RM never sees; evaluation's "gold" reward. It reads other
    # features than the RM (judge_depth, judge_pooling), so the two do not share their errors by construction
    judge: bool = True
    judge_split: str = Field("validation", pattern=r"^[A-Za-z0-9_-]+$")
    max_judge_pairs: int | None = Field(300, ge=1)
    judge_depth: float = Field(0.4, gt=0, le=1)
    judge_pooling: Literal["last", "mean"] = "last"
    # steps between resumable checkpoints of the fine-tuning modes (full, top_layers) in
    # output_dir/reward/checkpoints/{model,judge}/step-N (0: none); a rerun with the same output_dir resumes
    checkpoint_every: int = Field(0, ge=0)
    lora: LoraConfig = Field(default_factory=LoraConfig)  # LoRA adapters in full mode (r = 0: train every weight)
    activation_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)

    @model_validator(mode="after")
    def _check_lora(self) -> "RewardConfig":
        if self.lora.r and self.mode != "full":
            raise ValueError(f"reward.lora.r > 0 needs reward.mode 'full' (got '{self.mode}': the head mode fits a head "
                             "on frozen features, top_layers fine-tunes whole blocks)")
        return self


def shorter_wins_accuracy(responses: list[list[str]]) -> float:
    """Accuracy of the rule "the shorter reply wins" on comparisons ranked best first (ties count half).

    Args:
        responses: per comparison, the K responses best first; every pair (w, l) counts once.
    """
    correct = total = 0.0
    for row in responses:
        for w in range(len(row)):
            for l in range(w + 1, len(row)):
                a, b = len(row[w]), len(row[l])
                correct += 1.0 if a < b else 0.5 if a == b else 0.0
                total += 1
    return correct / total if total else float("nan")


def _select(frame, n: int | None, seed: int):
    if n is not None and len(frame) > n:
        return frame.sample(n=n, random_state=seed).sort_index()
    return frame


def fit_linear_head(
    chosen_feats: torch.Tensor, rejected_feats: torch.Tensor, l2: float, max_iter: int = 200
) -> torch.Tensor:
    """Fit ``w`` minimising ``mean(-log σ(w·(f_w − f_l))) + l2/N · ||w||²`` on standardised features (L-BFGS).

    This is the ranking loss for K = 2 with a linear head on frozen features.

    Args:
        chosen_feats, rejected_feats: ``[N, H]`` features of the preferred and the other response.
        l2: ridge strength.

    Returns:
        ``[H]`` weights for the raw (unstandardised) features, float32.
    """
    feats = torch.cat([chosen_feats, rejected_feats]).double()
    scale = feats.std(0).clamp(min=1e-6)
    diff = (chosen_feats.double() - rejected_feats.double()) / scale
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    n = diff.shape[0]

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(diff @ w).mean() + l2 / n * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach() / scale).float()


def choose_head_l2(
    chosen_feats: torch.Tensor, rejected_feats: torch.Tensor, candidates: list[float], folds: int = 5, seed: int = 0
) -> tuple[float, dict[float, float]]:
    """Pick the ridge strength of :func:`fit_linear_head` by ``folds``-fold cross-validation of the ranking loss.

    The criterion is the held-out mean log-likelihood ``log σ(w·(f_w − f_l))`` (smoother than accuracy on a few hundred
    pairs). Returns ``(best l2, {l2: cv mean log-likelihood})``; with fewer than ``2 * folds`` pairs the largest
    candidate is returned untested.
    """
    n = chosen_feats.shape[0]
    if n < 2 * folds or len(candidates) == 1:
        return max(candidates), {}
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scores: dict[float, float] = {}
    for l2 in candidates:
        loglik = 0.0
        for k in range(folds):
            held = order[k::folds]
            keep = torch.ones(n, dtype=torch.bool)
            keep[held] = False
            w = fit_linear_head(chosen_feats[keep], rejected_feats[keep], l2)
            margins = (chosen_feats[held] - rejected_feats[held]) @ w
            loglik += float(torch.nn.functional.logsigmoid(margins).sum())
        scores[l2] = loglik / n
    best = max(candidates, key=lambda l2: (scores[l2], l2))
    return best, scores


def kept_layers(blocks: int, depth: float) -> int:
    """The number of the first transformer blocks a reward model of ``depth`` (a share in (0, 1]) keeps out of
    ``blocks``: ``round(depth · blocks)``, at least 1 (``kept_layers(30, 0.5) == 15``, ``kept_layers(2, 0.5) == 1``)."""
    return max(1, min(blocks, round(depth * blocks)))


def head_view(cfg: RewardConfig, blocks: int, judge: bool = False) -> tuple[int, str]:
    """What the RM's (or with ``judge`` the judge's) head reads of a backbone with ``blocks`` blocks:
    ``(blocks kept, pooling)`` from ``reward.depth`` and ``reward.pooling`` (``reward.judge_*``)."""
    return (kept_layers(blocks, cfg.judge_depth if judge else cfg.depth),
            cfg.judge_pooling if judge else cfg.pooling)


def build_reward_model(path: str | Path, cfg: RewardConfig, device: torch.device, judge: bool = False
                       ) -> ScalarHeadModel:
    """The reward model (or with ``judge`` the judge) before training: ``path`` (the SFT model, or a saved RM) cut to
    its first ``reward.depth`` (``reward.judge_depth``) share of the blocks (:func:`kept_layers`) with a scalar head
    reading ``reward.pooling`` (``reward.judge_pooling``), in fp32 (the master weights); in ``top_layers`` mode only the
    top ``reward.top_layers`` blocks, the final norm and the head are trainable; with ``reward.lora.r > 0`` (``full``
    mode) LoRA adapters and the whole head train."""
    num_layers, pooling = head_view(cfg, AutoConfig.from_pretrained(str(path)).num_hidden_layers, judge)
    model = ScalarHeadModel.from_pretrained(path, device, torch.float32, num_layers=num_layers, pooling=pooling)
    if cfg.mode == "top_layers":
        for p in model.parameters():
            p.requires_grad_(False)
        for module in (*list(model.backbone.layers)[-cfg.top_layers :], model.backbone.norm, model.head):
            for p in module.parameters():
                p.requires_grad_(True)
    elif cfg.mode == "full" and cfg.lora.r:
        model.seq_cls = add_lora(model.seq_cls, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                                 scalar_head=True)
    return model


def _lr_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0.1 of the peak learning rate over ``total`` steps (InstructGPT App. C.2)."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total))


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of the train rows for ``epoch`` (no generator state to carry across a resume)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, "reward"))).tolist()


def _train_finetune(
    model: ScalarHeadModel, tokenizer, train, cfg: RewardConfig, seed: int, log: MetricLogger, engine: Engine,
    checkpoint_root: Path | None = None, config_hash: str = "",
) -> dict[str, float]:
    """Fine-tune (all, the top layers, or LoRA adapters) with the ranking loss; one batch element = all K responses of
    one prompt, ``reward.batch_size`` prompts a step.

    On N workers each takes its share of a step's prompts (a worker left without one runs a stand-in with weight 0),
    and the loss is the sum of its prompts' ranking losses divided by the step's prompt count, times N (FSDP averages
    gradients): N workers take the step one process takes.

    With ``checkpoint_root`` and ``reward.checkpoint_every`` > 0 a checkpoint is written every that many steps and
    after the last one (:mod:`rlhf_pipeline.tasks.checkpoints`), and training resumes from the newest one of
    ``config_hash`` found there: weights and optimizer state (sharded), the step (data order and learning rate follow
    from it) and the per-step history (replayed to ``log``). A checkpoint after the last step trains nothing and
    returns the same figures.

    Returns:
        ``train_loss`` and ``train_accuracy`` (means over all steps), ``steps`` and ``resumed_from_step`` (0 when
        fresh).
    """
    here = engine.world
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    rows = list(train.itertuples())
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    device = engine.device
    checkpoints = checkpoint_root is not None and cfg.checkpoint_every > 0
    config_hash = f"{config_hash}:{len(rows)}"
    history: list[dict[str, float]] = []
    step = 0
    found = latest_step(checkpoint_root, config_hash) if checkpoints else None
    if found is not None:
        folder, state = found
        tensors = training_state(model, optimizer)
        load_step(folder, tensors)
        restore_training_state(model, optimizer, tensors)
        step, history = state["step"], state["history"]
        for i, figures in enumerate(history, start=1):  # the resumed run's MLflow curve is complete
            log(figures, i)
    resumed_from = step
    model.train()
    with progress("reward model", total) as advance:
        if step:
            advance(step)
        while step < total:
            epoch, position = divmod(step, steps_per_epoch)
            order = _epoch_order(len(rows), seed, epoch)
            batch = [rows[i] for i in order[position * cfg.batch_size : (position + 1) * cfg.batch_size]]
            mine = [batch[i] for i in range(here.rank, len(batch), here.size)] or batch[:1]
            weight = len(mine) / len(batch) if len(batch) > here.rank else 0.0  # a stand-in counts for nothing
            torch.manual_seed(step_seed(seed, step, "reward", here.rank))
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * _lr_factor(step, total)
            k = max(len(r.responses) for r in mine)
            parts = []
            for r in mine:
                resp = list(r.responses) + [r.responses[-1]] * (k - len(r.responses))
                parts += [encode_pair(tokenizer, list(r.prompt), text, cfg.max_length, split=True) for text in resp]
            ids, mask, response_mask = pad_pairs(parts, tokenizer.pad_token_id)
            with engine.autocast():
                rewards = model.score(ids.to(device), mask.to(device), response_mask.to(device)).view(len(mine), k)
            num = torch.tensor([len(r.responses) for r in mine], device=device)
            loss = ranking_loss(rewards, num) * weight  # this worker's share of the mean over the step's prompts
            optimizer.zero_grad()
            (loss * here.size).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            correct = ranking_accuracy(rewards.detach(), num).sum() * (weight > 0)
            loss_value = float(distributed.all_reduce(loss.detach().double()))
            acc = float(distributed.all_reduce(correct.double())) / len(batch)
            figures = {"reward/loss": loss_value, "reward/accuracy": acc,
                       "reward/grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                                 else grad_norm),
                       "reward/learning_rate": cfg.learning_rate * _lr_factor(step, total)}
            history.append(figures)
            log(figures, step)
            advance(1, loss=loss_value, acc=acc)
            if checkpoints and (step % cfg.checkpoint_every == 0 or step == total):
                save_step(checkpoint_root, step, training_state(model, optimizer),
                          {"config_hash": config_hash, "step": step, "history": history, "workers": here.size},
                          keep=2)
    model.eval()
    losses = [h["reward/loss"] for h in history]
    accs = [h["reward/accuracy"] for h in history]
    return {"train_loss": sum(losses) / len(losses), "train_accuracy": sum(accs) / len(accs), "steps": float(step),
            "resumed_from_step": float(resumed_from)}


def _flat(frame) -> tuple[list[list[dict]], list[str]]:
    """Comparisons -> parallel lists (prompt, response) with every response of every row, in order."""
    prompts, texts = [], []
    for r in frame.itertuples():
        for text in r.responses:
            prompts.append(list(r.prompt))
            texts.append(text)
    return prompts, texts


def _per_row(values: torch.Tensor, frame) -> list[torch.Tensor]:
    """Split a flat ``[sum K, ...]`` tensor back into one ``[K, ...]`` tensor per comparison."""
    out, i = [], 0
    for r in frame.itertuples():
        out.append(values[i : i + len(r.responses)])
        i += len(r.responses)
    return out


def _ranked_pairs(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ranked pair (w above l) of every comparison: ``([P, H] preferred, [P, H] other)``."""
    chosen = torch.stack([r[w] for r in rows for w in range(len(r)) for l in range(w + 1, len(r))])
    rejected = torch.stack([r[l] for r in rows for w in range(len(r)) for l in range(w + 1, len(r))])
    return chosen, rejected


def _head_scores(weight: torch.Tensor, bias: float, feats: torch.Tensor) -> torch.Tensor:
    """Scores from cached last-token features: ``features · w + bias``, ``[N]``."""
    return feats.float() @ weight.float() + bias


def _fit_head(feats: torch.Tensor, frame, cfg: RewardConfig, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Head-only mode: fit the linear head on frozen features (ridge chosen by cross-validation).

    Returns:
        ``(weight [H], figures)``.
    """
    chosen, rejected = _ranked_pairs(_per_row(feats, frame))
    l2, cv = choose_head_l2(chosen, rejected, cfg.head_l2_candidates, seed=seed)
    weight = fit_linear_head(chosen, rejected, l2)
    margins = (chosen - rejected) @ weight
    return weight, {"head_l2": l2, "head_cv_loglik": cv.get(l2, float("nan")), "steps": 1.0,
                    "train_loss": float(-torch.nn.functional.logsigmoid(margins).mean()),
                    "train_accuracy": float((margins > 0).float().mean())}


def _save_reward_model(model: ScalarHeadModel | None, engine: Engine, build, folder: Path, tokenizer,
                       head: torch.Tensor | None = None, bias: float = 0.0) -> None:
    """Write a reward model as a plain transformers folder (LoRA merged, fp32, the bias in its config) on worker 0.

    ``model`` is the trained model (sharded or not); in head mode it is ``None`` and ``build()`` gives the frozen
    backbone, which gets the fitted ``head`` weights.
    """
    if model is not None and not distributed.is_wrapped(model):
        plain = model
    else:
        state = distributed.full_state_dict(model) if model is not None else None
        plain = build() if engine.world.is_main else None
        if plain is not None and state is not None:
            plain.load_state_dict(state)
    if engine.world.is_main:
        with torch.no_grad():
            if head is not None:
                plain.head.weight.copy_(head.view(1, -1).to(plain.head.weight.dtype))
            plain.bias.fill_(bias if model is None else float(model.bias))
        plain.to(torch.float32).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    distributed.barrier()


def _held_out_metrics(scores: torch.Tensor, frame, prefix: str = "") -> dict[str, float | list]:
    """Pairwise accuracy of ``scores`` (flat, in ``frame``'s order) with its 95% Wilson interval."""
    rows = _per_row(scores, frame)
    correct = sum(float(ranking_accuracy(r.view(1, -1))[0]) for r in rows)
    low, high = wilson_interval(correct, len(rows))
    return {f"{prefix}accuracy": correct / len(rows), f"{prefix}accuracy_ci": [low, high],
            f"{prefix}mean_score_chosen": float(torch.stack([r[0] for r in rows]).mean()),
            f"{prefix}mean_score_rejected": float(torch.stack([r[-1] for r in rows]).mean())}


def run_reward(
    cfg: RewardConfig,
    model_cfg: ModelConfig,
    prepared_dir: str | Path,
    sft_model_path: str | Path,
    output_dir: str | Path,
    log: MetricLogger = no_log,
) -> StageResult:
    """Train the reward model from the SFT model on train comparisons; evaluate on held-out (test) comparisons.

    With ``reward.judge`` a second, independent **judge** RM is trained the same way on the ``reward.judge_split``
    comparisons, which the training RM never sees, and evaluated on the same held-out pairs; evaluation uses it as the
    "gold" reward to catch over-optimisation of the training ("proxy") RM (Gao et al. 2022). The judge reads other
    features of the SFT model than the RM (``reward.judge_depth`` of its blocks, ``reward.judge_pooling``), so a
    judge that agrees with the RM is evidence, not an echo of the same features.

    Args:
        cfg: the ``reward`` section.
        model_cfg: the ``model`` section (seed, device).
        prepared_dir: folder with ``comparisons.parquet`` and ``demonstrations.parquet``.
        sft_model_path: the SFT model folder.
        output_dir: the RM is saved to ``output_dir/model``, the judge to ``output_dir/judge``; checkpoints of the
            fine-tuning modes go to ``output_dir/checkpoints/{model,judge}`` when ``reward.checkpoint_every`` > 0, and
            a rerun with the same configuration, inputs and ``output_dir`` resumes from the newest (a training whose
            checkpoint is after its last step is not repeated).
        log: receives ``reward/loss``, ``reward/accuracy``, ``reward/grad_norm`` per step.

    Returns:
        StageResult with ``paths.model`` (and ``paths.judge``) and metrics ``accuracy`` (held-out pairwise accuracy),
        ``accuracy_ci`` (95% Wilson ``[low, high]``), ``accuracy_shorter_baseline``, ``eval_pairs``, ``train_pairs``,
        ``train_loss``, ``train_accuracy``, ``normalization_bias``, ``mean_score_chosen``, ``mean_score_rejected``,
        with a judge ``judge_accuracy``, ``judge_accuracy_ci``, ``judge_train_pairs``, ``judge_normalization_bias``;
        in the fine-tuning modes ``steps`` and ``resumed_from_step`` (the RM's, 0 when fresh); ``wall_s``.

    Raises:
        ValueError: when there are no train or no held-out comparisons (or no judge comparisons with a judge).
    """
    start = time.time()
    output_dir = Path(output_dir)
    seed = model_cfg.seed
    seed_everything(seed)
    engine = Engine.create(resolve_device(model_cfg.device), model_cfg.precision)
    device = engine.device
    train = _select(load_prepared(prepared_dir, "comparisons", split="train"), cfg.max_train_pairs, seed)
    held_out = _select(load_prepared(prepared_dir, "comparisons", split="test"), cfg.max_eval_pairs, seed)
    if len(train) == 0 or len(held_out) == 0:
        raise ValueError(f"need train and test comparisons in {prepared_dir}: got {len(train)} and {len(held_out)}")
    judge_train = None
    if cfg.judge:
        judge_train = _select(load_prepared(prepared_dir, "comparisons", split=cfg.judge_split), cfg.max_judge_pairs, seed)
        if len(judge_train) == 0:
            raise ValueError(f"reward.judge needs comparisons in the '{cfg.judge_split}' split of {prepared_dir}")
    demos = load_prepared(prepared_dir, "demonstrations", split="train").head(64) if cfg.normalize else None

    tokenizer = load_tokenizer(sft_model_path)
    metrics: dict[str, float | list | str] = {
        "train_pairs": float(len(train)), "eval_pairs": float(len(held_out)),
        "accuracy_shorter_baseline": shorter_wins_accuracy([list(r.responses) for r in held_out.itertuples()]),
        "workers": float(engine.world.size),
    }

    def encode(model, prompts, texts, what, features=False, views=()):
        """Features of the frozen backbone (``[N, V, H]`` with ``views``) or scores of a reward model, shared out over
        the workers; the whole set in one call, so its batches are sorted by length over all of it."""
        with progress(what, len(texts)) as advance:
            return score_texts(model, tokenizer, prompts, texts, cfg.max_length, cfg.batch_size, features=features,
                               engine=engine, views=views, advance=advance)

    def build(device=torch.device("cpu"), judge: bool = False) -> ScalarHeadModel:
        return build_reward_model(sft_model_path, cfg, device, judge)

    layout = StageDir(output_dir)
    paths = {"model": str(layout.model)}
    if cfg.judge:
        paths["judge"] = str(layout.judge)
    if cfg.mode == "head":
        # one frozen backbone, as deep as the deeper of the two heads, gives both heads' features (views) of the
        # held-out pairs and the demonstrations in one pass; each head's own train rows go through a backbone cut at
        # that head's depth (the same features: block n's output, normalised), no deeper
        blocks = AutoConfig.from_pretrained(str(sft_model_path)).num_hidden_layers
        views = {"": head_view(cfg, blocks)}
        fitted = {"": (train, "RM")}
        if judge_train is not None:
            views["judge_"] = head_view(cfg, blocks, judge=True)
            fitted["judge_"] = (judge_train, "judge")

        def frozen_backbone(num_layers: int) -> ScalarHeadModel:
            return engine.prepare(ScalarHeadModel.from_pretrained(
                sft_model_path, device, torch.float32, num_layers=num_layers).eval().requires_grad_(False))

        deepest = max(n for n, _ in views.values())
        backbone = frozen_backbone(deepest)
        heads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for prefix, (rows, who) in fitted.items():
                own = backbone if views[prefix][0] == deepest else frozen_backbone(views[prefix][0])
                feats = encode(own, *_flat(rows), f"{who} features (train)", views=(views[prefix],))[:, 0]
                del own
                heads[prefix], fit = _fit_head(feats, rows, cfg, seed)
                metrics.update(fit if not prefix else {f"judge_{k}": v for k, v in fit.items() if k != "steps"})
            log({"reward/loss": metrics["train_loss"], "reward/accuracy": metrics["train_accuracy"]}, 1)
            shared = tuple(views.values())
            held_feats = encode(backbone, *_flat(held_out), "features (held-out)", views=shared)
            demo_feats = (encode(backbone, [list(p) for p in demos.prompt], list(demos.response),
                                 "features (demos)", views=shared) if demos is not None else None)
            for v, (prefix, weight) in enumerate(heads.items()):
                bias = 0.0
                if demo_feats is not None:  # App. C.2: the demonstrations' mean score is 0
                    bias = -float(_head_scores(weight, 0.0, demo_feats[:, v]).mean())
                metrics.update(_held_out_metrics(_head_scores(weight, bias, held_feats[:, v]), held_out, prefix))
                metrics[f"{prefix}normalization_bias"] = bias
        del backbone
        for prefix, weight in heads.items():
            _save_reward_model(None, engine, functools.partial(build, judge=bool(prefix)),
                               layout.judge if prefix else layout.model, tokenizer, weight,
                               metrics[f"{prefix}normalization_bias"])
    else:
        config_hash = f"{section_hash(cfg)}:{seed}:{model_cfg.precision}:{sft_model_path}"
        checkpoints = StageDir(output_dir).checkpoints
        trained = {"": (train, log), "judge_": (judge_train, no_log)} if judge_train is not None else {"": (train, log)}
        for prefix, (rows, logger) in trained.items():
            model = engine.prepare(build(device, judge=bool(prefix)), cfg.activation_checkpointing)
            fit = _train_finetune(model, tokenizer, rows, cfg, seed, logger, engine,
                                  checkpoints / ("judge" if prefix else "model"),
                                  f"{config_hash}:{'judge' if prefix else 'model'}")
            metrics.update(fit if not prefix else
                           {f"judge_{k}": v for k, v in fit.items() if k not in ("steps", "resumed_from_step")})
            with torch.no_grad():
                if demos is not None:
                    demo_scores = encode(model, [list(p) for p in demos.prompt], list(demos.response),
                                         f"{prefix or 'RM '}scores (demos)")
                    model.bias.fill_(float(model.bias) - float(demo_scores.mean()))
                scores = encode(model, *_flat(held_out), f"{prefix or 'RM '}scores (held-out)")
                metrics.update(_held_out_metrics(scores, held_out, prefix))
            metrics[f"{prefix}normalization_bias"] = float(model.bias)
            _save_reward_model(model, engine, functools.partial(build, judge=bool(prefix)),
                               layout.judge if prefix else layout.model, tokenizer)
            del model
    if judge_train is not None:
        metrics["judge_train_pairs"] = float(len(judge_train))
    log({"reward/eval_accuracy": metrics["accuracy"]}, int(metrics.get("steps", 1)))
    metrics["wall_s"] = time.time() - start
    return StageResult("reward", paths=paths, metrics=metrics)
