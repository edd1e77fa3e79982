"""Stage 4: does the PPO policy beat the SFT policy? (InstructGPT §4: win rate against a baseline on held-out prompts.)

On held-out (test) prompts both policies sample one response each with the same settings; the reward model scores
them. Reported: the win rate of PPO over SFT under the RM (ties count half) with a 95% Wilson interval, the same win
rate with the length effect regressed out (:func:`~rlhf_pipeline.tasks.statistics.length_controlled_win_rate`), mean
rewards, the KL of the PPO policy to SFT on its own samples (mean summed per-token ``log π − log π_sft``, nats), mean
response lengths and the fraction of responses that ended with an end token, the correlation of the training RM with
the judge, the perplexity of both policies on held-out pretraining text and on held-out demonstrations (the alignment
tax), a length-hack flag, one headline sentence (:func:`headline`) and a table of samples.
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
from rlhf_pipeline.tasks.statistics import length_controlled_win_rate, pearson, win_rate


class EvaluateConfig(Section):
    """Evaluation on held-out prompts."""

    num_prompts: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)  # the PPO sampling temperature, so kl_to_sft is the KL the penalty controls
    top_p: float = Field(1.0, gt=0, le=1)
    ppl_texts: int = Field(32, ge=1)  # held-out texts per perplexity (ptx_source and demonstrations, test split)
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


LENGTH_HACK_MIN_EOS = 0.9  # fewer of the policy's responses than this ending with an end token: a length hack
LENGTH_HACK_MAX_RATIO = 1.3  # the policy's mean length above this many times SFT's: a length hack
MODE_COLLAPSE_MIN_SHARE = 0.25  # one response text making up at least this share of the policy's: mode collapse


def response_diversity(texts: list[str]) -> tuple[float, float, str]:
    """How varied sampled responses are: ``(distinct share, share of the most common text, that text)``, shares of
    ``len(texts)`` in [0, 1]; the texts are compared whole and exactly. ``(nan, nan, "")`` for no texts."""
    if not texts:
        return float("nan"), float("nan"), ""
    counts: dict[str, int] = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    common = max(counts, key=lambda t: (counts[t], -texts.index(t)))  # ties: the first sampled
    return len(counts) / len(texts), counts[common] / len(texts), common


def mode_collapse(metrics: dict) -> bool:
    """Whether the policy collapsed onto one reply: the raw win rate's interval lies above 0.5 and one response text
    makes up at least ``MODE_COLLAPSE_MIN_SHARE`` of the policy's responses (``most_common_response_share_policy``)
    and more than SFT's most common does. A reward model that rewards one safe reply (an evasive refusal, an empty
    answer) above everything SFT says is hacked this way; neither the length rules nor the judge of the same data
    need see it. A missing figure does not count as evidence."""
    share, sft_share = metrics.get("most_common_response_share_policy"), metrics.get("most_common_response_share_sft")
    if share is None or not metrics["win_rate_vs_sft_ci"][0] > 0.5:
        return False
    return bool(share >= MODE_COLLAPSE_MIN_SHARE and (sft_share is None or share > sft_share))


def length_hack(metrics: dict) -> bool:
    """Whether the training RM's win comes from length rather than quality: the raw win rate's 95% interval lies above
    0.5 (``win_rate_vs_sft_ci``) but the length-controlled interval's lower end is ≤ 0.5
    (``win_rate_vs_sft_length_controlled_ci``), or fewer than 90% of the policy's responses ended with an end token
    (``ended_with_eos_policy``), or the policy's mean length (tokens) is more than 1.3× SFT's
    (``response_length_policy``, ``response_length_sft``). A missing figure does not count as evidence.

    Args:
        metrics: the evaluation's metrics (see :func:`run_evaluate`).
    """
    if not metrics["win_rate_vs_sft_ci"][0] > 0.5:
        return False
    controlled = metrics.get("win_rate_vs_sft_length_controlled_ci")
    eos = metrics.get("ended_with_eos_policy")
    length_policy, length_sft = metrics.get("response_length_policy"), metrics.get("response_length_sft")
    return bool((controlled is not None and controlled[0] <= 0.5)
                or (eos is not None and eos < LENGTH_HACK_MIN_EOS)
                or (length_policy is not None and length_sft is not None
                    and length_policy > LENGTH_HACK_MAX_RATIO * length_sft))


def _rate(metrics: dict, key: str) -> str:
    low, high = metrics[f"{key}_ci"]
    return f"{metrics[key]:.2f} [{low:.2f}, {high:.2f}]"


def _nats(kl: float) -> str:
    return f"{kl:.1f}" if abs(kl) >= 1 else f"{kl:.2f}"


def headline(metrics: dict) -> str:
    """One sentence a user can act on: did PPO beat SFT, and if not, why.

    The lead figure is the judge's win rate when the judge is informative (``judge_informative``), else the training
    RM's. "PPO beats SFT" only when the lead interval's lower end is above 0.5, there is no mode collapse
    (:func:`mode_collapse`), no length hack (:func:`length_hack`) and no over-optimisation flag. Mode collapse says the
    win comes from one repeated reply and gives its share, the reply, the distinct shares and the KL. A length hack
    says the win comes from length and gives the
    policy's end-token fraction, both mean lengths and the length-controlled win rate; over-optimisation says the
    judge disagrees with the training RM; otherwise "No measurable gain over SFT" with the reasons: the lead interval
    (it includes 0.5 or lies below it), a KL to SFT under 1 nat (the policy barely moved), a judge that carries no
    information.

    Args:
        metrics: the evaluation's metrics (see :func:`run_evaluate`): win rates with their ``_ci``, ``kl_to_sft``
            (nats), ``num_prompts``, lengths (tokens), ``ended_with_eos_policy`` and, with a judge, its win rate,
            ``judge_informative`` and ``over_optimisation``.
    """
    m = metrics
    has_judge = "win_rate_vs_sft_judge" in m
    informative = has_judge and bool(m.get("judge_informative"))
    hack = bool(m["length_hack"]) if "length_hack" in m else length_hack(m)
    collapsed = bool(m["mode_collapse"]) if "mode_collapse" in m else mode_collapse(m)
    over = bool(m.get("over_optimisation"))
    kl = m.get("kl_to_sft")
    kl_known = isinstance(kl, (int, float)) and math.isfinite(kl)
    lead_key, lead_name = (("win_rate_vs_sft_judge", "the judge") if informative else
                           ("win_rate_vs_sft", "the training RM"))
    no_judge = ("the judge carries no information" if has_judge and not informative else
                "" if has_judge else "no judge to check it")
    prompts = f"{int(m['num_prompts'])} held-out prompts" if "num_prompts" in m else "held-out prompts"
    at_kl = f"at {_nats(kl)} nats of KL" if kl_known else "at an unknown KL"
    if collapsed:
        common = m.get("most_common_response_policy", "")
        common = repr(common if len(common) <= 60 else common[:57] + "...")
        return (f"PPO's win under the training RM ({_rate(m, 'win_rate_vs_sft')}) comes from one reply repeated "
                f"(mode collapse): {100 * m['most_common_response_share_policy']:.1f}% of its responses are {common}, "
                f"{100 * m.get('distinct_responses_policy', float('nan')):.1f}% are distinct "
                f"(SFT: {100 * m.get('distinct_responses_sft', float('nan')):.1f}%), {at_kl}: the reward model rewards "
                "that reply; raise the KL penalty or train for fewer steps.")
    if hack:
        parts = [f"{100 * m['ended_with_eos_policy']:.1f}% of its responses end with an end token"
                 if "ended_with_eos_policy" in m else "",
                 f"mean length {m['response_length_policy']:.1f} tokens vs {m['response_length_sft']:.1f} for SFT"
                 if "response_length_policy" in m and "response_length_sft" in m else "",
                 f"length-controlled win rate {_rate(m, 'win_rate_vs_sft_length_controlled')}"
                 if "win_rate_vs_sft_length_controlled" in m else ""]
        text = (f"PPO's win under the training RM ({_rate(m, 'win_rate_vs_sft')}) comes from length, not quality: "
                + ", ".join(p for p in parts if p))
        if over:
            text += "; the judge prefers SFT (over-optimisation)"
        return text + "."
    if over:
        judge = f" ({_rate(m, 'win_rate_vs_sft_judge')})" if has_judge else ""
        caveat = f", though {no_judge}" if no_judge else ""
        return (f"Over-optimisation: the training RM prefers PPO ({_rate(m, 'win_rate_vs_sft')}) but the judge prefers "
                f"SFT{judge} {at_kl}{caveat}: raise the KL penalty or train for fewer steps.")
    low, high = m[f"{lead_key}_ci"]
    if low > 0.5:
        if informative:
            return (f"PPO beats SFT: win rate {_rate(m, lead_key)} under the judge, {_rate(m, 'win_rate_vs_sft')} "
                    f"under the training RM, {at_kl} on {prompts}.")
        return (f"PPO beats SFT: win rate {_rate(m, lead_key)} under the training RM, {at_kl} on {prompts} "
                f"({no_judge}).")
    where = "lies below 0.5 (SFT is better)" if high < 0.5 else "includes 0.5"
    reasons = [f"the win rate under {lead_name}, {_rate(m, lead_key)} on {prompts}, {where}"]
    if informative:
        reasons[0] += f", while the training RM gives {_rate(m, 'win_rate_vs_sft')}"
    if kl_known and kl < 1:
        reasons.append(f"the policy barely moved (KL {_nats(kl)} nats): train longer or with a larger learning rate")
    if has_judge and not informative:
        reasons.append(no_judge)
    return "No measurable gain over SFT: " + "; ".join(reasons) + "."


def heldout_dialogues(prepared_dir: str | Path, tokenizer, limit: int) -> list[str]:
    """The first ``limit`` test-split demonstrations (which neither SFT nor PPO-ptx trains on), each rendered with the
    tokenizer's chat template as the full dialogue: the prompt messages, then the demonstration as the assistant's
    turn. Empty when there are none."""
    frame = load_prepared(prepared_dir, "demonstrations", split="test").head(limit)
    return [tokenizer.apply_chat_template([*list(row.prompt), {"role": "assistant", "content": row.response}],
                                          tokenize=False)
            for row in frame.itertuples()]


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
        prepared_dir: folder with ``prompts.parquet`` and ``demonstrations.parquet`` (their test splits are used).
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

        - ``win_rate_vs_sft``, ``win_rate_vs_sft_ci`` (training RM; ties half, 95% Wilson interval);
        - ``win_rate_vs_sft_length_controlled`` (+ ``_ci``): the same on scores with ``reward_per_token · length``
          removed, ``reward_per_token`` (RM units per token) fitted over all 2N samples
          (:func:`~rlhf_pipeline.tasks.statistics.length_controlled_win_rate`);
        - ``mean_reward_policy``, ``mean_reward_sft`` (RM units), ``kl_to_sft`` (nats per response);
        - ``response_length_policy``, ``response_length_sft`` (mean tokens, end token included),
          ``ended_with_eos_policy``, ``ended_with_eos_sft`` (fraction of responses that ended with an end token
          rather than at ``max_new_tokens``), ``num_prompts``, ``workers``;
        - ``ppl_sft``, ``ppl_policy``, ``alignment_tax_ppl`` (policy − SFT; perplexity on ``ppo.ptx_source``'s test
          split, see :func:`perplexity`) when there is such text, and ``ppl_sft_heldout``, ``ppl_policy_heldout``,
          ``alignment_tax_ppl_heldout`` on the test-split demonstrations (:func:`heldout_dialogues`, which PPO-ptx
          never trains on) when there are any;
        - with a judge: ``win_rate_vs_sft_judge`` (+ ``_ci``), ``win_rate_vs_sft_judge_length_controlled``
          (+ ``_ci``), ``mean_judge_reward_policy``, ``mean_judge_reward_sft``, ``proxy_judge_correlation`` (Pearson
          correlation of the two RMs' scores over all 2N samples; nan when either is constant),
          ``judge_informative`` (1/0), ``over_optimisation`` (1/0) and ``judge_verdict`` (a sentence);
        - ``length_hack`` (1/0, :func:`length_hack`), ``headline`` (a sentence, :func:`headline`) and ``wall_s``.

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

    # the prompts are batched in order of length (little left padding); each worker takes whole global batches, and
    # batch b samples from a stream seeded by (seed, b), the same for both policies and whatever the number of workers
    by_length = sorted(range(len(queries)), key=lambda i: (len(queries[i]), i))
    mine = [(positions[0] // cfg.batch_size if positions else None, [by_length[p] for p in positions])
            for positions in distributed.batches(len(queries), cfg.batch_size, engine.world)]
    # the policy's own log-probabilities (for the KL) are read from the logits generate computes while sampling, as
    # in PPO's rollouts, where they are exact (fp32 compute); else a policy forward gives them
    logprobs_from_generate = engine.dtype == torch.float32
    found: dict[str, dict[int, tuple]] = {"sft": {}, "policy": {}}
    with torch.no_grad(), progress("evaluate", 2 * len(mine)) as advance:
        for name, model in (("sft", sft), ("policy", policy)):
            for number, idx in mine:
                batch = idx or [0]  # a stand-in keeps the workers' forward passes in step
                torch.manual_seed(step_seed(model_cfg.seed, number or 0, "evaluate"))
                with distributed.gathered(model), engine.autocast():
                    rollout = sample_responses(model, tokenizer, [queries[i] for i in batch], cfg.max_new_tokens,
                                               cfg.temperature, 0, cfg.top_p,
                                               with_logprobs=logprobs_from_generate and name == "policy")
                scored = (rollout.input_ids, rollout.attention_mask, rollout.sequence_response_mask)
                with engine.autocast():
                    scores = reward_model.score(*scored).cpu()
                    judged = (judge.score(*scored).cpu() if judge is not None
                              else torch.full_like(scores, float("nan")))
                    mask = rollout.response_mask.float()
                    kl = torch.full_like(scores, float("nan"))
                    if name == "policy":
                        args = (rollout.input_ids, rollout.attention_mask, rollout.query_length, cfg.temperature)
                        lp_policy = (rollout.logprobs if rollout.logprobs is not None
                                     else response_logprobs(policy, *args)[0])
                        lp_sft, _ = response_logprobs(sft, *args)
                        kl = ((lp_policy - lp_sft) * mask).sum(1).cpu()
                texts = tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)
                ended = rollout.ended.cpu()
                for j, i in enumerate(idx):
                    found[name][i] = (float(scores[j]), float(judged[j]), float(mask[j].sum()), texts[j], float(kl[j]),
                                      bool(ended[j]))
                advance(1)
    results = {}
    for name in found:
        merged_rows: dict[int, tuple] = {}
        for part in distributed.gather_objects(found[name]):
            merged_rows.update(part)
        rows = [merged_rows[i] for i in range(len(queries))]
        results[name] = {"scores": torch.tensor([r[0] for r in rows]), "judge": torch.tensor([r[1] for r in rows]),
                         "lengths": torch.tensor([r[2] for r in rows]), "texts": [r[3] for r in rows],
                         "kl": torch.tensor([r[4] for r in rows]), "ended": torch.tensor([r[5] for r in rows])}

    s_sft, s_pol = results["sft"]["scores"], results["policy"]["scores"]
    len_sft, len_pol = results["sft"]["lengths"], results["policy"]["lengths"]
    rate, (low, high) = win_rate(s_pol, s_sft)
    lc_rate, (lc_low, lc_high), per_token = length_controlled_win_rate(s_pol, s_sft, len_pol, len_sft)
    metrics = {
        "win_rate_vs_sft": rate,
        "win_rate_vs_sft_ci": [low, high],
        "win_rate_vs_sft_length_controlled": lc_rate,
        "win_rate_vs_sft_length_controlled_ci": [lc_low, lc_high],
        "reward_per_token": per_token,
        "mean_reward_policy": float(s_pol.mean()),
        "mean_reward_sft": float(s_sft.mean()),
        "kl_to_sft": float(results["policy"]["kl"].mean()),
        "response_length_policy": float(len_pol.mean()),
        "response_length_sft": float(len_sft.mean()),
        "ended_with_eos_policy": float(results["policy"]["ended"].float().mean()),
        "ended_with_eos_sft": float(results["sft"]["ended"].float().mean()),
        "num_prompts": float(len(queries)),
        "workers": float(engine.world.size),
    }
    if judge is not None:
        j_sft, j_pol = results["sft"]["judge"], results["policy"]["judge"]
        j_rate, (j_low, j_high) = win_rate(j_pol, j_sft)
        j_lc_rate, (j_lc_low, j_lc_high), _ = length_controlled_win_rate(j_pol, j_sft, len_pol, len_sft)
        informative = bool(judge_accuracy_ci and shorter_baseline is not None and judge_accuracy_ci[0] > shorter_baseline)
        over = bool(metrics["mean_reward_policy"] > metrics["mean_reward_sft"] and float(j_pol.mean()) < float(j_sft.mean()))
        metrics.update(
            win_rate_vs_sft_judge=j_rate,
            win_rate_vs_sft_judge_ci=[j_low, j_high],
            win_rate_vs_sft_judge_length_controlled=j_lc_rate,
            win_rate_vs_sft_judge_length_controlled_ci=[j_lc_low, j_lc_high],
            proxy_judge_correlation=pearson(torch.cat([s_sft, s_pol]), torch.cat([j_sft, j_pol])),
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
    dialogues = heldout_dialogues(prepared_dir, tokenizer, cfg.ppl_texts)
    if dialogues:
        ppl_sft = perplexity(sft, tokenizer, dialogues, cfg.ppl_max_tokens, cfg.batch_size, engine)
        ppl_policy = perplexity(policy, tokenizer, dialogues, cfg.ppl_max_tokens, cfg.batch_size, engine)
        metrics.update(ppl_sft_heldout=ppl_sft, ppl_policy_heldout=ppl_policy,
                       alignment_tax_ppl_heldout=ppl_policy - ppl_sft)
    for name in ("policy", "sft"):
        distinct, share, common = response_diversity(results[name]["texts"])
        metrics[f"distinct_responses_{name}"] = distinct
        metrics[f"most_common_response_share_{name}"] = share
        metrics[f"most_common_response_{name}"] = common
    metrics["length_hack"] = float(length_hack(metrics))
    metrics["mode_collapse"] = float(mode_collapse(metrics))
    metrics["headline"] = headline(metrics)
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
