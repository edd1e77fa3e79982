"""Stage 4: does the PPO policy beat the SFT policy? (InstructGPT §4: win rate against a baseline on held-out prompts.)

On held-out (test) prompts both policies sample one response each with the same settings; the reward model scores
them. Reported: the win rate of PPO over SFT under the RM (ties count half) with a 95% Wilson interval, mean rewards,
the KL of the PPO policy to SFT on its own samples (mean summed per-token ``log π − log π_sft``, nats), mean response
lengths, and a table of samples.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from pydantic import Field, model_validator

from rlhf_pipeline.models import distributed
from rlhf_pipeline.models.distributed import Engine
from rlhf_pipeline.models.loading import assert_same_tokenizer, load_causal_lm, load_tokenizer, resolve_device
from rlhf_pipeline.models.losses import lm_loss
from rlhf_pipeline.models.policy import response_logprobs, sample_responses
from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import chat_prompt_ids, pad_sequences
from rlhf_pipeline.tasks.checkpoints import step_seed
from rlhf_pipeline.tasks.datasets import load_prepared
from rlhf_pipeline.tasks.formats import last_user_turn
from rlhf_pipeline.tasks.ppo import PPOConfig, pretraining_texts
from rlhf_pipeline.tasks.progress import progress
from rlhf_pipeline.tasks.report import plot_ppo_curves, write_html_report
from rlhf_pipeline.tasks.stage import MetricLogger, ModelConfig, Section, StageDir, StageResult, no_log
from rlhf_pipeline.tasks.statistics import win_rate


class EvaluateConfig(Section):
    """Evaluation on held-out prompts."""

    num_prompts: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)  # the PPO sampling temperature, so kl_to_sft is the KL the penalty controls
    top_p: float = Field(1.0, gt=0, le=1)
    ppl_texts: int = Field(32, ge=1)  # held-out pretraining texts (ppo.ptx_source, test split) for the alignment tax
    ppl_max_tokens: int = Field(128, ge=2)

    @model_validator(mode="after")
    def _check_sampling(self) -> "EvaluateConfig":
        if self.top_p != 1.0:
            raise ValueError("evaluate.top_p must stay 1.0: kl_to_sft is computed from the log-probabilities of the "
                             "full softmax, which would not describe top-p samples")
        return self


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int, engine: Engine | None = None
               ) -> float:
    """Token-weighted perplexity ``exp(mean NLL)`` of ``model`` on ``texts`` (each cut to ``max_tokens`` tokens); with
    an ``engine``, in its precision and shared out over its workers.

    Used for the alignment tax: the change of perplexity on held-out pretraining text from SFT to PPO (InstructGPT
    §4.2 reports the regressions PPO-ptx is meant to reduce).
    """
    engine = engine or Engine(distributed.World(), torch.float32)
    device = next(model.parameters()).device
    total_nll, total_tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for idx in distributed.batches(len(texts), batch_size, engine.world):
        ids = [tokenizer(texts[i], add_special_tokens=False)["input_ids"][:max_tokens] for i in idx or [0]]
        input_ids, mask = pad_sequences(ids, tokenizer.pad_token_id, side="right")
        input_ids, mask = input_ids.to(device), mask.to(device)
        with engine.autocast():
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        if idx:  # a stand-in batch only keeps the workers' forward passes in step
            n = mask[:, 1:].sum().double().cpu()
            total_nll += lm_loss(logits, input_ids, mask).double().cpu() * n
            total_tokens += n
    return math.exp(float(distributed.all_reduce(total_nll)) / max(float(distributed.all_reduce(total_tokens)), 1.0))


def _judge_verdict(informative: bool, over: bool, accuracy_ci, baseline) -> str:
    if not informative:
        ci = f"[{accuracy_ci[0]:.3f}, {accuracy_ci[1]:.3f}]" if accuracy_ci else "unknown"
        return (f"The judge RM's held-out accuracy {ci} does not beat the 'shorter reply wins' baseline "
                f"({baseline:.3f}): its verdicts carry no information." if baseline is not None else
                "The judge RM's accuracy is unknown: its verdicts carry no information.")
    if over:
        return "Over-optimisation: the training RM prefers the PPO policy while the judge prefers SFT."
    return "The judge beats the baseline; its win rate is an independent check of the training RM's."


def held_out_queries(cfg: EvaluateConfig, seed: int, prepared_dir: str | Path, tokenizer):
    """The evaluation prompts: ``evaluate.num_prompts`` test-split prompts drawn with the model seed (the same prompts
    for every run on the same data version), as ``(rows, messages, queries)`` where ``queries`` are chat-template token
    id lists cut to ``evaluate.max_prompt_tokens``.

    Raises:
        ValueError: when the prepared data holds no test prompts.
    """
    prompts = load_prepared(prepared_dir, "prompts", split="test")
    if len(prompts) == 0:
        raise ValueError(f"no test prompts in {prepared_dir}")
    prompts = prompts.sample(n=min(cfg.num_prompts, len(prompts)), random_state=seed).sort_index()
    messages = [list(p) for p in prompts.prompt]
    queries = [chat_prompt_ids(tokenizer, m, cfg.max_prompt_tokens) for m in messages]
    return prompts, messages, queries


def run_evaluate(
    cfg: EvaluateConfig,
    model_cfg: ModelConfig,
    ppo_cfg: PPOConfig,
    prepared_dir: str | Path,
    sft_model_path: str | Path,
    policy_model_path: str | Path,
    reward_model_path: str | Path,
    output_dir: str | Path,
    log: MetricLogger = no_log,
    judge_model_path: str | Path | None = None,
    upstream_metrics: dict[str, dict] | None = None,
    ppo_history: str | Path | None = None,
) -> StageResult:
    """Compare the PPO policy with the SFT policy on held-out prompts under the reward model, and under the judge RM
    when one is given (trained on comparisons the training RM never saw).

    The judge's verdicts are reported as informative only when its held-out accuracy interval lies above the "shorter
    reply wins" baseline; over-optimisation is flagged when the training (proxy) RM prefers the PPO policy while the
    judge prefers SFT (Gao et al. 2022).

    Args:
        cfg: the ``evaluate`` section.
        model_cfg: the ``model`` section (seed, device).
        ppo_cfg: the ``ppo`` section (``ptx_source``: the held-out text of the alignment tax).
        prepared_dir: folder with ``prompts.parquet`` (test prompts are used).
        sft_model_path, policy_model_path: the two policies compared.
        reward_model_path: the training (proxy) RM.
        output_dir: where the samples, the report and the plot go.
        log: unused (the evaluation has no steps); kept for the common stage signature.
        judge_model_path: the judge RM, if any.
        upstream_metrics: ``{stage: metrics}`` of the earlier stages: the report shows them, and the reward stage's
            ``judge_accuracy_ci`` and ``accuracy_shorter_baseline`` decide whether the judge is informative.
        ppo_history: PPO's ``history.json`` (the curves in the report and ``ppo_curves.png``).

    Returns:
        StageResult with ``paths.samples`` (JSON lines: prompt, both responses, both rewards), ``paths.report`` (the
        HTML report), ``paths.ppo_curves`` (PNG, when there is a PPO history) and metrics
        ``win_rate_vs_sft``, ``win_rate_vs_sft_ci``, ``mean_reward_policy``, ``mean_reward_sft``, ``kl_to_sft``,
        ``response_length_policy``, ``response_length_sft``, ``num_prompts``, ``ppl_sft``, ``ppl_policy`` and
        ``alignment_tax_ppl`` (perplexity on held-out pretraining text, see :func:`perplexity`), with a judge
        ``win_rate_vs_sft_judge``, ``win_rate_vs_sft_judge_ci``, ``mean_judge_reward_policy``,
        ``mean_judge_reward_sft``, ``judge_informative`` (1/0), ``over_optimisation`` (1/0) and ``judge_verdict``
        (a sentence); ``wall_s``.

    Raises:
        ValueError: when there are no test prompts or the models do not share a tokenizer.
    """
    start = time.time()
    upstream_metrics = upstream_metrics or {}
    judge_accuracy_ci = upstream_metrics.get("reward", {}).get("judge_accuracy_ci")
    shorter_baseline = upstream_metrics.get("reward", {}).get("accuracy_shorter_baseline")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine.create(resolve_device(model_cfg.device), model_cfg.precision)
    device = engine.device
    tokenizer = load_tokenizer(policy_model_path)
    assert_same_tokenizer(tokenizer, load_tokenizer(reward_model_path), "policy and reward model")
    prompts, messages, queries = held_out_queries(cfg, model_cfg.seed, prepared_dir, tokenizer)

    def frozen(model):
        return engine.prepare(model.eval().requires_grad_(False))

    sft = frozen(load_causal_lm(sft_model_path, device, torch.float32))
    policy = frozen(load_causal_lm(policy_model_path, device, torch.float32))
    reward_model = frozen(ScalarHeadModel.from_pretrained(reward_model_path, device, torch.float32))
    judge = None
    if judge_model_path is not None:
        assert_same_tokenizer(tokenizer, load_tokenizer(judge_model_path), "policy and judge reward model")
        judge = frozen(ScalarHeadModel.from_pretrained(judge_model_path, device, torch.float32))

    # each worker takes whole global batches; batch b samples from a stream seeded by (seed, b), the same for both
    # policies and whatever the number of workers
    mine = distributed.batches(len(queries), cfg.batch_size, engine.world)
    found: dict[str, dict[int, tuple]] = {"sft": {}, "policy": {}}
    with torch.no_grad(), progress("evaluate", 2 * len(mine)) as advance:
        for name, model in (("sft", sft), ("policy", policy)):
            for idx in mine:
                batch = idx or [0]  # a stand-in keeps the workers' forward passes in step
                torch.manual_seed(step_seed(model_cfg.seed, batch[0] // cfg.batch_size, "evaluate"))
                with distributed.gathered(model), engine.autocast():
                    rollout = sample_responses(model, tokenizer, [queries[i] for i in batch], cfg.max_new_tokens,
                                               cfg.temperature, 0, cfg.top_p)
                with engine.autocast():
                    scores = reward_model.score(rollout.input_ids, rollout.attention_mask).cpu()
                    judged = (judge.score(rollout.input_ids, rollout.attention_mask).cpu() if judge is not None
                              else torch.full_like(scores, float("nan")))
                    mask = rollout.response_mask.float()
                    kl = torch.full_like(scores, float("nan"))
                    if name == "policy":
                        args = (rollout.input_ids, rollout.attention_mask, rollout.query_length, cfg.temperature)
                        lp_policy, _ = response_logprobs(policy, *args)
                        lp_sft, _ = response_logprobs(sft, *args)
                        kl = ((lp_policy - lp_sft) * mask).sum(1).cpu()
                texts = tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    found[name][i] = (float(scores[j]), float(judged[j]), float(mask[j].sum()), texts[j], float(kl[j]))
                advance(1)
    results = {}
    for name in found:
        merged_rows: dict[int, tuple] = {}
        for part in distributed.gather_objects(found[name]):
            merged_rows.update(part)
        rows = [merged_rows[i] for i in range(len(queries))]
        results[name] = {"scores": torch.tensor([r[0] for r in rows]), "judge": torch.tensor([r[1] for r in rows]),
                         "lengths": torch.tensor([r[2] for r in rows]), "texts": [r[3] for r in rows],
                         "kl": torch.tensor([r[4] for r in rows])}

    s_sft, s_pol = results["sft"]["scores"], results["policy"]["scores"]
    rate, (low, high) = win_rate(s_pol, s_sft)
    metrics = {
        "win_rate_vs_sft": rate,
        "win_rate_vs_sft_ci": [low, high],
        "mean_reward_policy": float(s_pol.mean()),
        "mean_reward_sft": float(s_sft.mean()),
        "kl_to_sft": float(results["policy"]["kl"].mean()),
        "response_length_policy": float(results["policy"]["lengths"].mean()),
        "response_length_sft": float(results["sft"]["lengths"].mean()),
        "num_prompts": float(len(queries)),
        "workers": float(engine.world.size),
    }
    if judge is not None:
        j_sft, j_pol = results["sft"]["judge"], results["policy"]["judge"]
        j_rate, (j_low, j_high) = win_rate(j_pol, j_sft)
        informative = bool(judge_accuracy_ci and shorter_baseline is not None and judge_accuracy_ci[0] > shorter_baseline)
        over = bool(metrics["mean_reward_policy"] > metrics["mean_reward_sft"] and float(j_pol.mean()) < float(j_sft.mean()))
        metrics.update(
            win_rate_vs_sft_judge=j_rate,
            win_rate_vs_sft_judge_ci=[j_low, j_high],
            mean_judge_reward_policy=float(j_pol.mean()),
            mean_judge_reward_sft=float(j_sft.mean()),
            judge_informative=float(informative),
            over_optimisation=float(over),
            judge_verdict=_judge_verdict(informative, over, judge_accuracy_ci, shorter_baseline),
        )
    texts = pretraining_texts(ppo_cfg.ptx_source, prepared_dir, split="test")[: cfg.ppl_texts]
    if texts:
        ppl_sft = perplexity(sft, tokenizer, texts, cfg.ppl_max_tokens, cfg.batch_size, engine)
        ppl_policy = perplexity(policy, tokenizer, texts, cfg.ppl_max_tokens, cfg.batch_size, engine)
        metrics.update(ppl_sft=ppl_sft, ppl_policy=ppl_policy, alignment_tax_ppl=ppl_policy - ppl_sft)
    layout = StageDir(output_dir)
    samples = [{
        "id": row.id,
        "prompt": last_user_turn(messages[i]),
        "sft_response": results["sft"]["texts"][i],
        "policy_response": results["policy"]["texts"][i],
        "sft_reward": float(s_sft[i]),
        "policy_reward": float(s_pol[i]),
    } for i, row in enumerate(prompts.itertuples())]
    metrics["wall_s"] = time.time() - start
    paths = {"samples": str(layout.samples), "report": str(layout.report)}
    history = json.loads(Path(ppo_history).read_text()) if ppo_history and Path(ppo_history).exists() else []
    if history:
        paths["ppo_curves"] = str(layout.ppo_curves)
    if engine.world.is_main:
        with open(layout.samples, "w") as fh:
            for sample in samples:
                fh.write(json.dumps(sample) + "\n")
        if history:
            plot_ppo_curves(history, layout.ppo_curves)
        write_html_report(layout.report, {**upstream_metrics, "evaluate": metrics}, history, samples)
    distributed.barrier()
    return StageResult("evaluate", paths=paths, metrics=metrics)
