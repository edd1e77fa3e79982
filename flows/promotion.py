"""The last two steps of a pipeline run, as Prefect tasks: register the challenger, then gate it against the champion.

The gates themselves are a pure decision (:func:`rlhf_pipeline.tasks.promotion.check_gates`); moving the aliases is
:mod:`rlhf_pipeline.flows.registry`'s; promotions never interleave (:func:`rlhf_pipeline.flows.locks.promotion_lock`).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rlhf_pipeline.flows import artifacts, registry, tracking
from rlhf_pipeline.flows.config import Config
from rlhf_pipeline.flows.locks import promotion_lock
from rlhf_pipeline.flows.runner import RunContext, StageOutcome
from rlhf_pipeline.tasks.promotion import Decision, check_gates, win_rate_vs_champion
from rlhf_pipeline.tasks.stage import numeric_metrics


@task(name="register", cache_policy=NO_CACHE)
def register_task(config: Config, ctx: RunContext, policy: str, reward_model: str) -> list[registry.RegisteredModel]:
    """Log the final policy and reward model and register them as ``challenger`` (the policy version records the
    reward model version of the same run; each version carries the content hash of its files,
    :data:`~rlhf_pipeline.flows.registry.WEIGHTS_TAG`). When versions with exactly these weights are registered
    already (PPO and the RM were reused, or re-ran to the same bytes), nothing new is registered and those versions
    are returned with ``reused`` set; a run whose weights differ registers its own, whatever its cache keys.

    Returns:
        ``[reward model, policy]`` versions.
    """
    names = (config.registry.reward_model_name, config.registry.policy_name)
    digests = {"policy": registry.weights_digest(policy), "reward_model": registry.weights_digest(reward_model)}
    existing = registry.find_same_weights(names[1], names[0], digests["policy"], digests["reward_model"])
    if existing is not None:
        get_run_logger().info("these weights (sha256 %s…) are registered already as %s version %s with %s version %s: "
                              "nothing new to register", digests["policy"][:12], names[1], existing[1].version,
                              names[0], existing[0].version)
        for entry in existing:
            entry.reused = True
        return existing
    tags = {**ctx.tags, "rlhf.mlflow_parent_run_id": ctx.parent_run_id, "rlhf.ppo_cache_key": ctx.keys["ppo"],
            "rlhf.reward_cache_key": ctx.keys["reward"], "rlhf.sft_cache_key": ctx.keys["sft"]}
    with tracking.stage_run(ctx.experiment_id, ctx.parent_run_id, "register", {}, ctx.tags):
        rm = registry.log_and_register(reward_model, "reward_model", names[0],
                                       {**tags, registry.WEIGHTS_TAG: digests["reward_model"]})
        policy_entry = registry.log_and_register(policy, "policy", names[1],
                                                 {**tags, "rlhf.reward_model_version": str(rm.version),
                                                  registry.WEIGHTS_TAG: digests["policy"]})
    return [rm, policy_entry]


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(config: Config, ctx: RunContext, prepared_dir: str, registered: list[registry.RegisteredModel],
                 reward: StageOutcome, evaluation: StageOutcome, policy: str, project_dir: str) -> Decision:
    """Gate the challenger against the champion and move ``champion`` (policy and RM together) when every gate passes.

    The win rate over the champion is judged by this run's judge RM (the training RM when there is none). Writes the
    decision as model-version tags, a nested MLflow run ``promote`` and the Prefect markdown artifact
    ``rlhf-promotion``.
    """
    logger = get_run_logger()
    names = {e.name: e for e in registered}
    policy_name, rm_name = config.registry.policy_name, config.registry.reward_model_name
    challenger = names[policy_name].version
    judge_model = reward.paths.get("judge")
    figures: dict = {"kl_to_sft": evaluation.metrics.get("kl_to_sft"),
                     "reward_accuracy": reward.metrics.get("accuracy"),
                     "judge_informative": bool(evaluation.metrics.get("judge_informative"))}
    with promotion_lock(project_dir), tracking.stage_run(ctx.experiment_id, ctx.parent_run_id, "promote", {},
                                                          ctx.tags):
        import mlflow

        repaired = registry.repair_champions(policy_name, rm_name)
        if repaired:
            logger.warning("champion pair repaired before the promotion: %s", repaired)
        champion = registry.champion_version(policy_name)
        figures["has_champion"] = champion is not None
        if champion is not None:
            judge = judge_model or reward.paths["model"]
            figures["judge"] = "judge RM" if judge_model else "training RM (no judge in this run)"
            champion_dir = registry.download_model_dir(policy_name, registry.CHAMPION,
                                                       ctx.stage_dir("promote").root / "champion")
            try:
                if champion_dir is None:
                    raise ValueError(f"{policy_name}@champion has no model folder")
                figures.update(win_rate_vs_champion(config.evaluate, config.model, prepared_dir, policy, champion_dir,
                                                    judge))
            except ValueError as exc:  # e.g. a champion on another tokenizer: the win-rate gate fails, saying why
                figures["win_rate_vs_champion"] = None
                figures["comparison_error"] = str(exc)
        passed, reasons = check_gates(figures, config.promotion)
        decision = Decision(passed, reasons, figures, champion_version=challenger if passed else champion,
                            challenger_version=challenger, previous_champion=champion)
        registry.apply_decision(decision, policy_name, rm_name, names[rm_name].version)
        mlflow.log_metrics({f"promotion/{k}": v for k, v in numeric_metrics(figures).items()})
        mlflow.set_tags({"rlhf.promotion.decision": "promoted" if passed else "rejected",
                         "rlhf.promotion.challenger_version": str(challenger)})
    logger.info("promotion of %s version %s: %s\n%s", policy_name, challenger,
                "promoted" if passed else "not promoted", "\n".join(reasons))
    artifacts.promotion_artifact(artifacts.decision_markdown(decision, policy_name))
    return decision


def skipped_promotion(config: Config, registered: list[registry.RegisteredModel]) -> dict:
    """The promotion entry of a run that registered nothing new (its policy was judged by an earlier run); publishes
    ``rlhf-promotion`` saying so."""
    champion = registry.champion_version(config.registry.policy_name)
    artifacts.promotion_artifact(
        f"**skipped**: `{config.registry.policy_name}` version {registered[-1].version} was registered and judged by an "
        f"earlier run; no new challenger. Champion: version {champion}.\n")
    return {"promoted": False, "skipped": True,
            "reasons": ["this policy was registered and judged by an earlier run; no new challenger"],
            "champion_version": champion}
