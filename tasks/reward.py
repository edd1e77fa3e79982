"""Stage 2: the reward model, trained on ranked comparisons (InstructGPT §3.5 "Reward modeling", App. C.2).

The RM starts from the SFT model with its LM head replaced by a scalar head and is trained with the ranking loss
(:func:`models.losses.ranking_loss`) over all C(K,2) pairs of each prompt. Three modes (``reward.mode``):

- ``full``: fine-tune backbone and head (the paper; the GPU default).
- ``top_layers``: fine-tune only the top ``reward.top_layers`` transformer blocks, the final norm and the head.
- ``head``: freeze the backbone, read its last-token features once, and fit the linear head by L2-regularised
  ranking loss (a logistic regression on feature differences, solved with L-BFGS). On 2 CPU cores this buys the most
  accuracy per minute (measured in the design: ~64% vs ~54% for fine-tuning in the same time).

After training a bias is set so that the mean score of the SFT demonstrations is 0 (App. C.2), stored with the model.
Held-out accuracy is reported with a 95% Wilson interval next to the trivial baseline "the shorter reply wins".

The fine-tuning modes write resumable checkpoints when ``reward.checkpoint_every`` > 0
(``output_dir/checkpoints/{model,judge}/step-NNNNNN``); a rerun with the same configuration, inputs and ``output_dir``
resumes from the newest and ends with the same models and metrics as an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from rlhf_pipeline.models.loading import default_dtype, load_tokenizer, resolve_device
from rlhf_pipeline.models.losses import ranking_accuracy, ranking_loss
from rlhf_pipeline.models.reward_model import ScalarHeadModel, score_texts
from rlhf_pipeline.models.tokens import encode_pair, pad_sequences
from rlhf_pipeline.tasks.checkpoints import latest_step_checkpoint, rng_state, save_step_checkpoint, set_rng_state
from rlhf_pipeline.tasks.datasets import load_prepared
from rlhf_pipeline.tasks.progress import progress
from rlhf_pipeline.tasks.stage import (
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
    # the judge RM: trained like the RM on a split the RM never sees; evaluation's "gold" reward
    judge: bool = True
    judge_split: str = Field("validation", pattern=r"^[A-Za-z0-9_-]+$")
    max_judge_pairs: int | None = Field(300, ge=1)
    # steps between resumable checkpoints of the fine-tuning modes (full, top_layers) in
    # output_dir/reward/checkpoints/{model,judge}/step-N (0: none); a rerun with the same output_dir resumes
    checkpoint_every: int = Field(0, ge=0)


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


def save_reward_checkpoint(root: Path, step: int, model: ScalarHeadModel, state: dict, keep: int = 2) -> Path:
    """Write ``root/step-NNNNNN`` atomically (:func:`rlhf_pipeline.tasks.checkpoints.save_step_checkpoint`): the model's weights
    (``model.safetensors``) and ``state.pt`` (optimizer, scheduler, RNG states, the permutation generator, epoch and
    position in the epoch's permutation, per-step history, configuration hash). Only the newest ``keep`` are kept."""
    from safetensors.torch import save_model

    return save_step_checkpoint(root, step, lambda folder: save_model(model, str(folder / "model.safetensors")),
                                state, keep)


def latest_reward_checkpoint(root: Path, config_hash: str) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``root`` written under ``config_hash`` and its loaded ``state.pt`` (``None`` if there
    is none). Temporary folders of a write cut short by a kill are removed."""
    return latest_step_checkpoint(root, config_hash, required=("state.pt", "model.safetensors"))


def _train_finetune(
    model: ScalarHeadModel, tokenizer, train, cfg: RewardConfig, seed: int, log: MetricLogger,
    checkpoint_root: Path | None = None, config_hash: str = "",
) -> dict[str, float]:
    """Fine-tune (all or the top layers) with the ranking loss; one batch element = all K responses of one prompt.

    With ``checkpoint_root`` and ``reward.checkpoint_every`` > 0 a checkpoint is written every that many steps and
    after the last one (:func:`save_reward_checkpoint`), and training resumes from the newest one of ``config_hash``
    found there: weights, optimizer, scheduler, RNG states, the epoch's permutation and the position in it, and the
    per-step history (replayed to ``log``). A checkpoint after the last step trains nothing and returns the same
    figures.

    Returns:
        ``train_loss`` and ``train_accuracy`` (means over all steps), ``steps`` and ``resumed_from_step`` (0 when
        fresh).
    """
    if cfg.mode == "top_layers":
        for p in model.parameters():
            p.requires_grad_(False)
        layers = model.backbone.layers
        for layer in list(layers)[-cfg.top_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for module in (model.backbone.norm, model.head):
            for p in module.parameters():
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    rows = list(train.itertuples())
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / total)))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    checkpoints = checkpoint_root is not None and cfg.checkpoint_every > 0
    config_hash = f"{config_hash}:{len(rows)}"
    history: list[dict[str, float]] = []
    step, first_epoch, position, order = 0, 0, 0, None
    found = latest_reward_checkpoint(checkpoint_root, config_hash) if checkpoints else None
    if found is not None:
        from safetensors.torch import load_model

        folder, state = found
        load_model(model, str(folder / "model.safetensors"), device=str(device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        step, first_epoch, position, order = state["step"], state["epoch"], state["position"], state["order"]
        history = state["history"]
        for i, figures in enumerate(history, start=1):  # the resumed run's MLflow curve is complete
            log(figures, i)
    resumed_from = step
    model.train()
    with progress("reward model", total) as advance:
        if step:
            advance(step)
        for epoch in range(first_epoch, cfg.epochs):
            if order is None:
                order = torch.randperm(len(rows), generator=generator).tolist()
            for start in range(position, len(order), cfg.batch_size):
                batch = [rows[i] for i in order[start : start + cfg.batch_size]]
                k = max(len(r.responses) for r in batch)
                seqs = []
                for r in batch:
                    resp = list(r.responses) + [r.responses[-1]] * (k - len(r.responses))
                    seqs += [encode_pair(tokenizer, list(r.prompt), text, cfg.max_length) for text in resp]
                ids, mask = pad_sequences(seqs, tokenizer.pad_token_id, side="right")
                rewards = model.score(ids.to(device), mask.to(device)).view(len(batch), k)
                num = torch.tensor([len(r.responses) for r in batch], device=device)
                loss = ranking_loss(rewards, num)
                optimizer.zero_grad()
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
                optimizer.step()
                scheduler.step()
                step += 1
                acc = float(ranking_accuracy(rewards.detach()).mean())
                loss_value = loss.item()
                figures = {"reward/loss": loss_value, "reward/accuracy": acc, "reward/grad_norm": grad_norm,
                           "reward/learning_rate": scheduler.get_last_lr()[0]}
                history.append(figures)
                log(figures, step)
                advance(1, loss=loss_value, acc=acc)
                if checkpoints and (step % cfg.checkpoint_every == 0 or step == total):
                    done = start + cfg.batch_size >= len(order)  # the epoch's last batch: the next one starts afresh
                    save_reward_checkpoint(checkpoint_root, step, model, {
                        "config_hash": config_hash, "step": step, "history": history,
                        "epoch": epoch + 1 if done else epoch, "position": 0 if done else start + cfg.batch_size,
                        "order": None if done else order, "generator": generator.get_state(), "rng": rng_state(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    })
            order, position = None, 0
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


def _head_scores(model: ScalarHeadModel, feats: torch.Tensor) -> torch.Tensor:
    """Scores from cached last-token features: ``head(features) + bias``, ``[N]``."""
    head = model.head
    return head(feats.to(head.weight.dtype).to(head.weight.device)).squeeze(-1).float().cpu() + float(model.bias)


def _fit_head(model: ScalarHeadModel, feats: torch.Tensor, frame, cfg: RewardConfig, seed: int) -> dict[str, float]:
    """Head-only mode: fit the linear head on frozen features (ridge chosen by cross-validation)."""
    chosen, rejected = _ranked_pairs(_per_row(feats, frame))
    l2, cv = choose_head_l2(chosen, rejected, cfg.head_l2_candidates, seed=seed)
    weight = fit_linear_head(chosen, rejected, l2)
    with torch.no_grad():
        model.head.weight.copy_(weight.view(1, -1).to(model.head.weight.dtype))
    margins = (chosen - rejected) @ weight
    return {"head_l2": l2, "head_cv_loglik": cv.get(l2, float("nan")), "steps": 1.0,
            "train_loss": float(-torch.nn.functional.logsigmoid(margins).mean()),
            "train_accuracy": float((margins > 0).float().mean())}


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
    "gold" reward to catch over-optimisation of the training ("proxy") RM (Gao et al. 2022). In head mode both heads
    read the same frozen SFT features, so the held-out pairs are encoded once.

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
    device = resolve_device(model_cfg.device)
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
    model = ScalarHeadModel.from_pretrained(sft_model_path, device, default_dtype(device)).eval()
    models = {"": model}
    metrics: dict[str, float | list | str] = {
        "train_pairs": float(len(train)), "eval_pairs": float(len(held_out)),
        "accuracy_shorter_baseline": shorter_wins_accuracy([list(r.responses) for r in held_out.itertuples()]),
    }

    def encode(prompts, texts, what, scorer=None):
        """Features of the frozen backbone (``scorer`` None) or scores of ``scorer``, with a progress display."""
        chunk, out = max(cfg.batch_size * 4, 16), []
        with progress(what, len(texts)) as advance:
            for i in range(0, len(texts), chunk):
                out.append(score_texts(scorer or model, tokenizer, prompts[i : i + chunk], texts[i : i + chunk],
                                       cfg.max_length, cfg.batch_size, features=scorer is None))
                advance(len(texts[i : i + chunk]))
        return torch.cat(out)

    if cfg.mode == "head":
        with torch.no_grad():
            metrics.update(_fit_head(model, encode(*_flat(train), "RM features (train)"), train, cfg, seed))
            log({"reward/loss": metrics["train_loss"], "reward/accuracy": metrics["train_accuracy"]}, 1)
            if judge_train is not None:
                judge = copy.deepcopy(model)
                judge_fit = _fit_head(judge, encode(*_flat(judge_train), "judge features (judge split)"), judge_train, cfg,
                                     seed)
                metrics.update({f"judge_{k}": v for k, v in judge_fit.items() if k != "steps"})
                models["judge_"] = judge
            held_feats = encode(*_flat(held_out), "RM features (held-out)")
            demo_feats = (encode([list(p) for p in demos.prompt], list(demos.response), "RM features (demos)")
                          if demos is not None else None)
            for prefix, m in models.items():
                if demo_feats is not None:  # App. C.2: the demonstrations' mean score is 0
                    m.bias.fill_(float(m.bias) - float(_head_scores(m, demo_feats).mean()))
                metrics.update(_held_out_metrics(_head_scores(m, held_feats), held_out, prefix))
    else:
        config_hash = f"{section_hash(cfg)}:{seed}:{sft_model_path}"
        checkpoints = StageDir(output_dir).checkpoints
        metrics.update(_train_finetune(model, tokenizer, train, cfg, seed, log, checkpoints / "model",
                                       f"{config_hash}:model"))
        if judge_train is not None:
            judge = ScalarHeadModel.from_pretrained(sft_model_path, device, default_dtype(device)).eval()
            models["judge_"] = judge
            judge_fit = _train_finetune(judge, tokenizer, judge_train, cfg, seed, no_log, checkpoints / "judge",
                                        f"{config_hash}:judge")
            metrics.update({f"judge_{k}": v for k, v in judge_fit.items() if k not in ("steps", "resumed_from_step")})
        with torch.no_grad():
            for prefix, m in models.items():
                if demos is not None:
                    demo_scores = score_texts(m, tokenizer, [list(p) for p in demos.prompt], list(demos.response),
                                              cfg.max_length, cfg.batch_size)
                    m.bias.fill_(float(m.bias) - float(demo_scores.mean()))
                scores = encode(*_flat(held_out), f"{prefix or 'RM '}scores (held-out)", scorer=m)
                metrics.update(_held_out_metrics(scores, held_out, prefix))
    for prefix, m in models.items():
        metrics[f"{prefix}normalization_bias"] = float(m.bias)
    if judge_train is not None:
        metrics["judge_train_pairs"] = float(len(judge_train))
    log({"reward/eval_accuracy": metrics["accuracy"]}, int(metrics.get("steps", 1)))

    paths = {}
    layout = StageDir(output_dir)
    for prefix, name, folder in (("", "model", layout.model), ("judge_", "judge", layout.judge)):
        if prefix in models:
            models[prefix].to(torch.float32).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            paths[name] = str(folder)
    metrics["wall_s"] = time.time() - start
    return StageResult("reward", paths=paths, metrics=metrics)
