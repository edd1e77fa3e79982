"""The champion/challenger decision: the promotion gates as a pure function of a challenger's figures, and the
comparison that gives its win rate over the champion.

Every successful run registers its policy and reward model as the ``challenger``; the ``champion`` alias moves to them
only when every gate of ``params.yaml``'s ``promotion`` section passes (:func:`check_gates`):

- **win rate over the champion**: the challenger policy and the champion policy each sample one response to the same
  held-out prompts with the same random stream (the evaluation prompts,
  :func:`rlhf_pipeline.tasks.evaluate.held_out_queries`); this
  run's judge RM (trained on comparisons the training RM never saw) scores both; ties count half (InstructGPT §4.1
  reports preference against a baseline policy the same way). No such gate while there is no champion.
- **KL to its SFT model** (nats per response), so a policy that left its SFT model far behind is never promoted.
- **reward-model accuracy** on held-out comparisons.
- optionally, a judge that beats the "shorter reply wins" baseline (else its win rate carries no information).

Writing the decision to the registry, moving the aliases, rolling back and serialising promotions are the
orchestration's job (:mod:`rlhf_pipeline.flows.registry`); this module imports neither MLflow nor Prefect.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import Field

from rlhf_pipeline.models.distributed import Engine
from rlhf_pipeline.models.loading import assert_same_tokenizer, load_causal_lm, load_tokenizer, resolve_device
from rlhf_pipeline.models.policy import sample_responses
from rlhf_pipeline.models.reward_model import ScalarHeadModel
from rlhf_pipeline.models.tokens import batched
from rlhf_pipeline.tasks.checkpoints import step_seed
from rlhf_pipeline.tasks.evaluate import EvaluateConfig, held_out_queries
from rlhf_pipeline.tasks.progress import progress
from rlhf_pipeline.tasks.stage import ModelConfig, Section
from rlhf_pipeline.tasks.statistics import win_rate


class PromotionConfig(Section):
    """Gates a challenger must pass before the ``champion`` alias moves to it (all must pass).

    The win rate is the challenger policy's over the champion policy under this run's judge RM on the same held-out
    prompts; there is no win-rate gate while no champion exists (the first run).
    """

    enabled: bool = True
    min_win_rate_vs_champion: float = Field(0.5, ge=0, le=1)
    max_kl_to_sft: float = Field(5.0, ge=0)  # nats per response, the challenger's KL to its own SFT model
    min_reward_accuracy: float = Field(0.55, ge=0, le=1)  # the challenger RM's held-out pairwise accuracy
    require_informative_judge: bool = False  # also require the judge to beat the "shorter reply wins" baseline


@dataclass
class Decision:
    """The outcome of the gates: ``promoted``, one line per gate (``pass: ...`` / ``FAIL: ...``) and the figures."""

    promoted: bool
    reasons: list[str]
    figures: dict = field(default_factory=dict)
    champion_version: int | None = None
    challenger_version: int | None = None
    previous_champion: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_gates(figures: dict, gates: PromotionConfig) -> tuple[bool, list[str]]:
    """Apply the promotion gates to a challenger's figures.

    Args:
        figures: ``has_champion`` (bool), ``win_rate_vs_champion`` and ``win_rate_vs_champion_ci`` (when there is one),
            ``kl_to_sft`` (nats), ``reward_accuracy`` (0..1), ``judge_informative`` (bool).
        gates: the ``promotion`` section.

    Returns:
        ``(all passed, one line per gate)``. A missing or NaN figure fails its gate.
    """
    checks: list[tuple[bool, str]] = []

    def number(key: str) -> float | None:
        value = figures.get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    win = number("win_rate_vs_champion")
    if not figures.get("has_champion"):
        checks.append((True, "no champion yet: no win-rate gate"))
    else:
        ci = figures.get("win_rate_vs_champion_ci") or [float("nan"), float("nan")]
        ok = win is not None and win >= gates.min_win_rate_vs_champion
        checks.append((ok, f"win rate over the champion (judge) {win if win is not None else float('nan'):.3f} "
                           f"[{ci[0]:.3f}, {ci[1]:.3f}] {'>=' if ok else '<'} {gates.min_win_rate_vs_champion:.3f}"))
    kl = number("kl_to_sft")
    ok = kl is not None and kl <= gates.max_kl_to_sft
    checks.append((ok, f"KL to SFT {kl if kl is not None else float('nan'):.3f} nats "
                       f"{'<=' if ok else '>'} {gates.max_kl_to_sft:.3f}"))
    acc = number("reward_accuracy")
    ok = acc is not None and acc >= gates.min_reward_accuracy
    checks.append((ok, f"reward-model accuracy {acc if acc is not None else float('nan'):.3f} "
                       f"{'>=' if ok else '<'} {gates.min_reward_accuracy:.3f}"))
    if gates.require_informative_judge:
        ok = bool(figures.get("judge_informative"))
        checks.append((ok, "the judge beats the 'shorter reply wins' baseline" if ok else
                           "the judge does not beat the 'shorter reply wins' baseline"))
    return all(ok for ok, _ in checks), [f"{'pass' if ok else 'FAIL'}: {text}" for ok, text in checks]


@torch.no_grad()
def win_rate_vs_champion(
    cfg: EvaluateConfig, model_cfg: ModelConfig, prepared_dir: str | Path, challenger_path: str | Path,
    champion_path: str | Path, judge_path: str | Path,
) -> dict:
    """The challenger policy against the champion policy on the evaluation prompts under the judge RM.

    Both policies sample with ``evaluate``'s settings, batch ``b`` from a stream seeded by ``(seed, b)`` as in the
    evaluation; the judge scores each ``(prompt, response)``. It runs in the flow's process, in ``model.precision``.

    Returns:
        ``win_rate_vs_champion`` (ties count half), ``win_rate_vs_champion_ci`` (95% Wilson),
        ``mean_judge_reward_challenger``, ``mean_judge_reward_champion``, ``num_prompts``.

    Raises:
        ValueError: when the policies or the judge do not share a tokenizer, or there are no test prompts.
    """
    engine = Engine.create(resolve_device(model_cfg.device), model_cfg.precision)
    device = engine.device
    tokenizer = load_tokenizer(challenger_path)
    assert_same_tokenizer(tokenizer, load_tokenizer(champion_path), "challenger and champion policies")
    assert_same_tokenizer(tokenizer, load_tokenizer(judge_path), "challenger policy and judge reward model")
    _, _, queries = held_out_queries(cfg, model_cfg.seed, prepared_dir, tokenizer)
    judge = ScalarHeadModel.from_pretrained(judge_path, device, torch.float32).eval()
    scores: dict[str, torch.Tensor] = {}
    batches = batched(list(range(len(queries))), cfg.batch_size)
    with progress("challenger vs champion", 2 * len(batches)) as advance:
        for name, path in (("challenger", challenger_path), ("champion", champion_path)):
            policy = load_causal_lm(path, device, torch.float32).eval()
            chunks = []
            for b, idx in enumerate(batches):
                torch.manual_seed(step_seed(model_cfg.seed, b, "evaluate"))
                with engine.autocast():
                    rollout = sample_responses(policy, tokenizer, [queries[i] for i in idx], cfg.max_new_tokens,
                                               cfg.temperature, 0, cfg.top_p)
                    chunks.append(judge.score(rollout.input_ids, rollout.attention_mask,
                                              rollout.sequence_response_mask).float().cpu())
                advance(1)
            scores[name] = torch.cat(chunks)
            del policy
    rate, (low, high) = win_rate(scores["challenger"], scores["champion"])
    return {"win_rate_vs_champion": rate, "win_rate_vs_champion_ci": [low, high],
            "mean_judge_reward_challenger": float(scores["challenger"].mean()),
            "mean_judge_reward_champion": float(scores["champion"].mean()), "num_prompts": float(len(queries))}
