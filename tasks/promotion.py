"""Champion/challenger promotion in the MLflow model registry.

Every successful run registers its policy and reward model as the ``challenger``. The ``champion`` alias moves to them
only when every gate of ``params.yaml``'s ``promotion`` section passes:

- **win rate over the champion**: the challenger policy and the champion policy each sample one response to the same
  held-out prompts with the same random stream (the evaluation prompts, :func:`tasks.evaluate.held_out_queries`); this
  run's judge RM (trained on comparisons the training RM never saw) scores both; ties count half (InstructGPT §4.1
  reports preference against a baseline policy the same way). No such gate while there is no champion.
- **KL to its SFT model** (nats per response), so a policy that left its SFT model far behind is never promoted.
- **reward-model accuracy** on held-out comparisons.
- optionally, a judge that beats the "shorter reply wins" baseline (else its win rate carries no information).

The decision and its figures are written as tags on the challenger's model versions (``rlhf.promotion.*``); a
promoted version also records the version it replaced (``rlhf.promotion.previous_champion``), which is what
:func:`rollback` returns to. Policy and reward model move together: the policy version carries the number of the reward
model version of the same run (``rlhf.reward_model_version``).

Promotions never interleave: :func:`promotion_lock` holds a file lock in the project folder (it serialises processes on
one machine, each of which may run its own temporary Prefect server) and, with a shared Prefect server, the global
concurrency limit ``rlhf-promotion`` (limit 1, created when missing; it serialises workers on several machines).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from flows.config import Config, PromotionConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
CONCURRENCY_LIMIT = "rlhf-promotion"
TAG = "rlhf.promotion."


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
    config: Config, prepared_dir: str | Path, challenger_path: str | Path, champion_path: str | Path,
    judge_path: str | Path,
) -> dict:
    """The challenger policy against the champion policy on the evaluation prompts under the judge RM.

    Both policies sample with ``evaluate``'s settings from the same seed; the judge scores each ``(prompt, response)``.

    Returns:
        ``win_rate_vs_champion`` (ties count half), ``win_rate_vs_champion_ci`` (95% Wilson),
        ``mean_judge_reward_challenger``, ``mean_judge_reward_champion``, ``num_prompts``.

    Raises:
        ValueError: when the policies or the judge do not share a tokenizer, or there are no test prompts.
    """
    from models.loading import assert_same_tokenizer, default_dtype, load_causal_lm, load_tokenizer, resolve_device
    from models.policy import sample_responses
    from models.reward_model import ScalarHeadModel
    from tasks.common import batched, progress, seed_everything
    from tasks.evaluate import held_out_queries, win_rate

    cfg = config.evaluate
    device = resolve_device(config.model.device)
    dtype = default_dtype(device)
    tokenizer = load_tokenizer(challenger_path)
    assert_same_tokenizer(tokenizer, load_tokenizer(champion_path), "challenger and champion policies")
    assert_same_tokenizer(tokenizer, load_tokenizer(judge_path), "challenger policy and judge reward model")
    _, _, queries = held_out_queries(config, prepared_dir, tokenizer)
    judge = ScalarHeadModel.from_pretrained(judge_path, device, dtype).eval()
    scores: dict[str, torch.Tensor] = {}
    batches = batched(list(range(len(queries))), cfg.batch_size)
    with progress("challenger vs champion", 2 * len(batches)) as advance:
        for name, path in (("challenger", challenger_path), ("champion", champion_path)):
            policy = load_causal_lm(path, device, dtype).eval()
            seed_everything(config.model.seed)
            chunks = []
            for idx in batches:
                rollout = sample_responses(policy, tokenizer, [queries[i] for i in idx], cfg.max_new_tokens,
                                           cfg.temperature, 0, cfg.top_p)
                chunks.append(judge.score(rollout.input_ids, rollout.attention_mask).float().cpu())
                advance(1)
            scores[name] = torch.cat(chunks)
            del policy
    rate, (low, high) = win_rate(scores["challenger"], scores["champion"])
    return {"win_rate_vs_champion": rate, "win_rate_vs_champion_ci": [low, high],
            "mean_judge_reward_challenger": float(scores["challenger"].mean()),
            "mean_judge_reward_champion": float(scores["champion"].mean()), "num_prompts": float(len(queries))}


def ensure_concurrency_limit(name: str = CONCURRENCY_LIMIT, limit: int = 1) -> None:
    """Create the Prefect global concurrency limit ``name`` when the server has none of that name."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except Exception:  # created concurrently by another promotion
                client.read_global_concurrency_limit_by_name(name)


@contextlib.contextmanager
def promotion_lock(project_dir: str | Path, timeout_s: float = 3600) -> Iterator[None]:
    """Hold the project's promotion file lock and, when ``PREFECT_API_URL`` names a shared Prefect server, a slot of
    its global concurrency limit ``rlhf-promotion`` (limit 1).

    Raises:
        TimeoutError: when another promotion holds them for more than ``timeout_s`` seconds.
    """
    import os

    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(project_dir) / ".rlhf-promotion.lock"))
    if os.environ.get("PREFECT_API_URL"):  # a shared Prefect server: workers on other machines see the limit
        from prefect.concurrency.sync import concurrency

        ensure_concurrency_limit()
        slot = concurrency(CONCURRENCY_LIMIT, occupy=1, timeout_seconds=timeout_s, strict=True)
    else:  # a temporary server lives in one process only: the file lock is what serialises local runs
        slot = contextlib.nullcontext()
    with slot:
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout as exc:
            raise TimeoutError(f"another promotion holds {lock.lock_file} for more than {timeout_s:.0f} s") from exc
        try:
            yield
        finally:
            lock.release()


def champion_version(name: str) -> int | None:
    """The version number ``name@champion`` points at, or ``None`` (no such model or alias)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return int(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def _tag(name: str, version: int, tags: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value)[:5000])


def apply_decision(decision: Decision, policy_name: str, reward_model_name: str, reward_model_version: int) -> None:
    """Write the decision on the challenger's versions (policy and reward model) and, if promoted, move ``champion``
    to both (the previous champion is recorded for :func:`rollback`)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {TAG + "decision": "promoted" if decision.promoted else "rejected", TAG + "time": stamp,
            TAG + "reasons": "; ".join(decision.reasons), TAG + "rolled_back_at": ""}
    for key, value in decision.figures.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[TAG + key] = f"{value:.6g}"
        elif isinstance(value, list):
            tags[TAG + key] = "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    if decision.promoted:
        tags[TAG + "previous_champion"] = "" if decision.previous_champion is None else str(decision.previous_champion)
        previous_rm = champion_version(reward_model_name)
        _tag(reward_model_name, reward_model_version,
             {**tags, TAG + "previous_champion": "" if previous_rm is None else str(previous_rm)})
        _tag(policy_name, decision.challenger_version, tags)
        client.set_registered_model_alias(reward_model_name, CHAMPION, str(reward_model_version))
        client.set_registered_model_alias(policy_name, CHAMPION, str(decision.challenger_version))
    else:
        _tag(policy_name, decision.challenger_version, tags)
        _tag(reward_model_name, reward_model_version, tags)


def rollback(policy_name: str, reward_model_name: str) -> dict:
    """Move ``champion`` of the policy and the reward model back to the versions they replaced.

    Returns:
        ``{"policy": (from, to), "reward_model": (from, to)}`` version numbers.

    Raises:
        LookupError: when the policy has no champion, or its champion records no previous champion.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    moves = {}
    for kind, name in (("policy", policy_name), ("reward_model", reward_model_name)):
        current = champion_version(name)
        if current is None:
            if kind == "policy":
                raise LookupError(f"{name} has no champion to roll back")
            continue
        previous = client.get_model_version(name, str(current)).tags.get(TAG + "previous_champion", "")
        if not previous:
            if kind == "policy":
                raise LookupError(f"{name}@champion (version {current}) replaced no earlier champion; "
                                  "nothing to roll back to")
            continue
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_model_version_tag(name, str(current), TAG + "decision", "rolled_back")
        client.set_model_version_tag(name, str(current), TAG + "rolled_back_at", stamp)
        client.set_registered_model_alias(name, CHAMPION, previous)
        moves[kind] = (current, int(previous))
    return moves


def promote_version(policy_name: str, reward_model_name: str, version: int) -> dict:
    """Make policy ``version`` (and the reward model version of its run) the champion by hand, recording the previous
    champion so :func:`rollback` can undo it.

    Raises:
        LookupError: when the version does not exist.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        policy = client.get_model_version(policy_name, str(version))
    except MlflowException as exc:
        raise LookupError(f"{policy_name} has no version {version}") from exc
    rm_version = policy.tags.get("rlhf.reward_model_version")
    decision = Decision(True, [f"pass: promoted by hand ({time.strftime('%Y-%m-%d %H:%M:%S')})"],
                        challenger_version=int(version), champion_version=int(version),
                        previous_champion=champion_version(policy_name))
    if decision.previous_champion == int(version):
        return {"unchanged": True}
    moves = {"policy": (decision.previous_champion, int(version))}
    if rm_version:
        moves["reward_model"] = (champion_version(reward_model_name), int(rm_version))
        apply_decision(decision, policy_name, reward_model_name, int(rm_version))
    else:  # a version registered without its reward model: move the policy alone
        _tag(policy_name, int(version), {TAG + "decision": "promoted",
                                         TAG + "previous_champion": decision.previous_champion or ""})
        client.set_registered_model_alias(policy_name, CHAMPION, str(version))
    return moves


def decision_markdown(decision: Decision, policy_name: str) -> str:
    """The Prefect markdown artifact of a decision: verdict, one row per gate, the figures."""
    verdict = (f"**promoted**: `{policy_name}` version {decision.challenger_version} is the champion"
               if decision.promoted else
               f"**not promoted**: `{policy_name}` version {decision.challenger_version} stays challenger; "
               f"champion stays at version {decision.previous_champion}")
    rows = "\n".join(f"| {'✅' if r.startswith('pass') else '❌'} | {r.split(': ', 1)[1]} |" for r in decision.reasons)
    figures = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in decision.figures.items() if not isinstance(v, list)
    )
    return f"{verdict}\n\n| gate | check |\n|---|---|\n{rows}\n\n| figure | value |\n|---|---|\n{figures}\n"
