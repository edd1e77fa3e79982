"""The Prefect flow ``rlhf-pipeline``: validate → SFT → reward model → PPO → evaluate → register → promote.

Each stage is one Prefect task around the plain function the stage table names
(:data:`rlhf_pipeline.flows.stages.STAGES`); tasks pass paths, hashes and small typed results, never models. Each opens
one nested MLflow run under the flow's parent run and publishes a Prefect markdown artifact ``rlhf-<stage>``; a stage
whose inputs are unchanged is reused instead of re-run (:mod:`rlhf_pipeline.flows.runner`). ``DIR/summary.json`` is
rewritten after every step, so a failed run still says how far it got; nothing is registered unless every stage before
``register`` succeeded, and ``champion`` moves only when the promotion gates pass.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rlhf_pipeline.flows import artifacts, dvc, registry, tracking
from rlhf_pipeline.flows.caching import code_version, stage_key
from rlhf_pipeline.flows.config import Config, load_config
from rlhf_pipeline.flows.locks import promotion_lock
from rlhf_pipeline.flows.promotion import promote_task, register_task, skipped_promotion
from rlhf_pipeline.flows.runner import RunContext, StageOutcome, execute, reuse, run_stage, stage_params
from rlhf_pipeline.flows.stages import STAGE, STAGES
from rlhf_pipeline.flows.summary import Summary
from rlhf_pipeline.tasks.stage import numeric_metrics


@dataclass
class DataOutcome(StageOutcome):
    """The data gate's outcome: a stage outcome plus the data version and the row counts."""

    version: str = ""
    counts: dict = field(default_factory=dict)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(config: Config, ctx: RunContext, project_dir: str) -> DataOutcome:
    """The data gate (GX) and the data version: ``dvc repro prepare`` in a DVC project whose ``params.yaml`` has this
    run's data section, else the same command without DVC, under the data lock; the stages then read the immutable
    copy ``data/versions/<data version>``, never ``data/prepared`` (which a later prepare may replace). Fails the
    flow before any training on bad data, keeping the last good version.

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: the gate failed.
        rlhf_pipeline.tasks.readers.DataError: a source could not be read.
    """
    import mlflow

    from rlhf_pipeline.tasks.datasets import load_prepared

    logger = get_run_logger()
    project = Path(project_dir)
    stage = STAGE["validate"]
    with tracking.stage_run(ctx.experiment_id, ctx.parent_run_id, stage.name, stage_params(config, stage),
                            ctx.tags) as (run_id, _):
        start = time.time()
        prepared = dvc.prepare_version(project, config, log=logger.info)
        version = prepared.name
        report = json.loads((prepared / "report.json").read_text())
        counts = {name: report["counts"][name]["total"] for name in ("demonstrations", "comparisons", "prompts")}
        dropped = report.get("dropped", [])
        unusual = report.get("structure_warnings", [])
        metrics = {**{f"rows_{k}": float(v) for k, v in counts.items()}, "dropped_rows": float(len(dropped)),
                   "unusual_rows": float(len(unusual)), "wall_s": time.time() - start}
        mlflow.log_metrics(metrics)
        mlflow.set_tag("data_version", version)
        mlflow.log_artifact(str(prepared / "report.json"), artifact_path="validation")
        for name in ("demonstrations", "comparisons", "prompts"):
            frame = load_prepared(prepared, name)[["id", "split", "source"]]
            dataset = mlflow.data.from_pandas(frame, source=str(prepared / f"{name}.parquet"), name=name,
                                              digest=version)
            mlflow.log_input(dataset, context=name)
        logger.info("data version %s (read from %s): %s; %d malformed rows dropped, %d kept with an unusual "
                    "structure (see %s)", version, prepared, counts, len(dropped), len(unusual),
                    prepared / "report.json")
    artifacts.stage_artifact(stage.name, "completed", metrics, ctx.link(run_id), f" (data version `{version}`)")
    return DataOutcome(stage.name, "completed", {"prepared_dir": str(prepared)}, metrics, run_id, str(prepared),
                       version=version, counts=counts)


def selection_reward_model(config: Config, folder: Path) -> tuple[str | None, str | None]:
    """The reward model that picks SFT's checkpoint (App. C.1): ``sft.selection_reward_model`` is ``champion`` (the
    registry's champion RM of the same base model, downloaded into ``folder``), a ``models:/`` URI, a folder, or
    ``None``.

    Returns:
        ``(local folder or None, models:/ URI used or None)``; ``(None, None)`` selects by validation loss.
    """
    choice = config.sft.selection_reward_model
    if not choice or not (choice == "champion" or choice.startswith("models:/")):
        return choice, None
    name, ref = ((config.registry.reward_model_name, registry.CHAMPION) if choice == "champion"
                 else registry.parse_model_ref(choice))
    version = registry.champion_version(name) if ref == registry.CHAMPION else int(ref)
    local = None
    if version is not None:
        local = registry.download_model_dir(name, str(version), folder,
                                            required_tags={"rlhf.base_model": config.model.base})
    used = f"models:/{name}/{version}" if local is not None else None
    get_run_logger().info("SFT checkpoint selection by %s", f"the mean score of {used} ({ref})" if used
                          else "validation loss (no champion reward model yet)")
    return (str(local) if local is not None else None), used


@task(name="sft", cache_policy=NO_CACHE)
def sft_task(config: Config, ctx: RunContext, prepared_dir: str) -> StageOutcome:
    """Supervised fine-tuning (InstructGPT §3.5), its checkpoint picked by the champion RM when there is one."""
    from rlhf_pipeline.models.loading import resolve_model_path

    stage = STAGE["sft"]
    hit = reuse(stage, config, ctx)
    if hit is not None:
        return hit
    rm, used = selection_reward_model(config, ctx.stage_dir(stage.name).root / "selection-rm")
    outcome = execute(stage, config, ctx, tags={"rlhf.selection_reward_model": used} if used else None,
                      prepared_dir=prepared_dir,
                      base_model_path=resolve_model_path(config.model.base, config.model.cache_dir),
                      selection_reward_model=rm)
    if used:
        outcome.metrics["selection_reward_model"] = used
    return outcome


@task(name="reward", cache_policy=NO_CACHE)
def reward_task(config: Config, ctx: RunContext, prepared_dir: str, sft_model: str) -> StageOutcome:
    """The reward model (and the judge) from the SFT model (InstructGPT §3.5)."""
    return run_stage("reward", config, ctx, prepared_dir=prepared_dir, sft_model_path=sft_model)


@task(name="ppo", cache_policy=NO_CACHE)
def ppo_task(config: Config, ctx: RunContext, prepared_dir: str, sft_model: str, reward_model: str) -> StageOutcome:
    """PPO with the per-token KL penalty to the SFT model (InstructGPT §3.5)."""
    return run_stage("ppo", config, ctx, prepared_dir=prepared_dir, sft_model_path=sft_model,
                     reward_model_path=reward_model)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: Config, ctx: RunContext, prepared_dir: str, sft: StageOutcome, reward: StageOutcome,
                  ppo: StageOutcome) -> StageOutcome:
    """PPO vs SFT on held-out prompts under the reward model and the judge; the HTML report; the samples as an MLflow
    table and the Prefect artifact ``rlhf-evaluation``."""
    import mlflow
    import pandas as pd

    outcome = run_stage("evaluate", config, ctx, prepared_dir=prepared_dir, sft_model_path=sft.paths["model"],
                        policy_model_path=ppo.paths["model"], reward_model_path=reward.paths["model"],
                        judge_model_path=reward.paths.get("judge"),
                        upstream_metrics={"reward": reward.metrics, "ppo": ppo.metrics},
                        ppo_history=ppo.paths.get("history"))
    if outcome.status == "completed":
        with tracking.reopen(outcome.mlflow_run_id):
            mlflow.log_table(pd.read_json(outcome.paths["samples"], lines=True), artifact_file="samples_table.json")
        artifacts.publish("rlhf-evaluation", "PPO vs SFT on held-out prompts", artifacts.evaluation_markdown(
            outcome.metrics, ctx.link(outcome.mlflow_run_id), outcome.paths["report"]))
    return outcome


class PipelineRun:
    """One flow run's bookkeeping: the parent MLflow run, ``summary.json`` and the :class:`RunContext`."""

    def __init__(self, config: Config, project: Path, out: Path, use_cache: bool, flow_run_id: str | None):
        self.config, self.project = config, project
        self.summary = Summary(out / "summary.json")
        experiment_id = tracking.setup_mlflow(project, config.registry.experiment)  # also closes runs left by a kill
        uri = tracking.redact_uri(tracking.tracking_uri(project))  # shown and stored: never a password
        names = (config.registry.policy_name, config.registry.reward_model_name)
        if registry.champions_need_repair(*names):  # a promotion killed half-way, completed before SFT reads the RM
            with promotion_lock(project):
                repaired = registry.repair_champions(*names)
            if repaired:
                get_run_logger().warning("champion pair repaired: %s", repaired)
        tags = {"rlhf.profile": config.profile, "rlhf.base_model": config.model.base,
                "rlhf.git_commit": dvc.git_commit(project), "rlhf.prefect_flow_run_id": flow_run_id or "",
                "rlhf.params_hash": config.params_hash(), "rlhf.code_version": code_version()}
        parent = tracking.start_parent_run(experiment_id, f"rlhf-{config.profile}", config.flat_params(),
                                           {**tags, "rlhf.kind": "pipeline", **tracking.process_tags()})
        from mlflow import MlflowClient

        # the resolved configuration: what `rlhf lineage --reproduce` re-runs
        MlflowClient().log_dict(parent, config.model_dump(mode="json"), "config.json")
        self.ctx = RunContext(experiment_id, parent, tags, str(out), uri, use_cache and config.cache.enabled)
        self.summary.update(mlflow_parent_run_id=parent, prefect_flow_run_id=flow_run_id, output_dir=str(out),
                            tracking_uri=uri, profile=config.profile, promotion=None)
        self.current = "validate"

    @contextlib.contextmanager
    def step(self, name: str):
        """Mark ``name`` running for the block (a stage's entry in the summary; ``register``/``promote`` are steps
        without one)."""
        self.current = name
        if name in self.summary.data["stages"]:
            self.summary.stage(name, "running")
        yield

    def record(self, outcome: StageOutcome) -> StageOutcome:
        self.summary.record(outcome)
        return outcome

    def set_data(self, data: DataOutcome) -> None:
        """Record the data version (and the labeling batches whose rankings it holds) and derive every stage's cache
        key from it."""
        from rlhf_pipeline.flows.feedback import labeling_batches

        batches = labeling_batches(self.config)
        self.summary.update(data={"version": data.version, "dir": data.output_dir, **data.counts, "labeling_batches": batches})
        self.ctx.tags["rlhf.data_version"] = data.version
        from mlflow import MlflowClient

        MlflowClient().set_tag(self.ctx.parent_run_id, "rlhf.data_version", data.version)
        if batches:  # lineage: the tag on every stage run and registered version; the full list as an artifact
            self.ctx.tags["rlhf.labeling_batches"] = batches_tag(batches)
            MlflowClient().set_tag(self.ctx.parent_run_id, "rlhf.labeling_batches", self.ctx.tags["rlhf.labeling_batches"])
            MlflowClient().log_dict(self.ctx.parent_run_id, batches, "labeling_batches.json")
        for stage in STAGES:
            if stage.cached:
                self.ctx.keys[stage.name] = stage_key(stage.name, self.config, data.version, self.ctx.keys)

    def log_headline(self, *outcomes: StageOutcome) -> None:
        """The stages' figures on the parent run too (``reward.accuracy``, ``evaluate.kl_to_sft``...), so the MLflow
        runs table shows them without opening the stage runs."""
        figures = {f"{o.stage}.{key}": o.metrics.get(key) for o in outcomes for key in STAGE[o.stage].figures}
        tracking.log_metrics_batch(self.ctx.parent_run_id, numeric_metrics(figures))

    def fail(self, exc: BaseException) -> None:
        if self.current in self.summary.data["stages"]:
            self.summary.stage(self.current, "failed")
        reused = [name for name, entry in self.summary.data["stages"].items() if entry.get("status") == "reused"]
        extra = {}
        if reused and self.current not in ("validate",):
            extra["hint"] = (f"this run reused the outputs of earlier runs ({', '.join(reused)}); if they are damaged, "
                             "`rlhf run --no-cache` re-runs every stage")
        self.summary.update(failed_stage=self.current, error=tracking.redact_text(f"{type(exc).__name__}: {exc}"),
                            **extra)
        tracking.end_run(self.ctx.parent_run_id, "FAILED")

    def finish(self) -> dict:
        tracking.end_run(self.ctx.parent_run_id, "FINISHED")
        return self.summary.data


def batches_tag(batches: list[dict], limit: int = 4000) -> str:
    """The tag ``rlhf.labeling_batches``: batch ids joined by commas, cut to ``limit`` characters with a count of the
    rest (the parent run's ``labeling_batches.json`` lists them all)."""
    ids = [b["batch_id"] for b in batches]
    text = ",".join(ids)
    if len(text) <= limit:
        return text
    kept = []
    for batch_id in ids:
        if len(",".join(kept + [batch_id])) > limit - 40:
            break
        kept.append(batch_id)
    return ",".join(kept) + f",... {len(ids) - len(kept)} more (labeling_batches.json)"


@flow(name="rlhf-pipeline")
def rlhf_pipeline(
    profile: str = "demo",
    config_path: str = "params.yaml",
    overrides: list[str] | None = None,
    project_dir: str = ".",
    output_dir: str | None = None,
    config: Config | None = None,
    use_cache: bool = True,
    register_models: bool = True,
) -> dict:
    """The InstructGPT recipe end to end: validate → SFT → reward model → PPO → evaluate → register → promote.

    Writes ``output_dir/summary.json`` and returns its content.

    Args:
        profile, config_path, overrides: the configuration (``load_config``); ``config`` instead gives it resolved.
            A relative ``config_path`` is relative to ``project_dir``.
        project_dir: the project folder (``params.yaml``, ``dvc.yaml``, ``mlflow.db``).
        output_dir: where the stages write (default ``runs/<profile>-<time>``, relative to ``project_dir``).
        use_cache: reuse stages whose inputs are unchanged (and ``cache.enabled``); ``False`` re-runs every stage.
        register_models: register the challenger and run the promotion gates (``False``: a reproduction that leaves the
            registry alone).

    Raises:
        rlhf_pipeline.models.loading.ModelLoadError: ``model.base`` does not exist (checked before any work).
        rlhf_pipeline.flows.tracking.TrackingUnavailable: the MLflow store cannot be used (checked before any work).
        rlhf_pipeline.tasks.validate.ValidationFailed: the data gate failed (no training ran, nothing registered; the
            last good data version is kept).
        rlhf_pipeline.tasks.readers.DataError: a data source could not be read (likewise).
        Exception: any stage's error; the summary marks the stage ``failed`` and the MLflow runs ``FAILED``.
    """
    from prefect.runtime import flow_run

    from rlhf_pipeline.models.loading import check_base_model

    project = Path(project_dir).resolve()
    if config is None:
        path = Path(config_path)
        config = load_config(path if path.is_absolute() else project / path, profile, overrides)
    check_base_model(config.model.base, config.model.cache_dir)  # before any work: a missing model fails now
    out = Path(output_dir or f"runs/{config.profile}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = out if out.is_absolute() else project / out
    out.mkdir(parents=True, exist_ok=True)
    run = PipelineRun(config, project, out, use_cache, str(flow_run.id) if flow_run.id else None)
    ctx = run.ctx
    try:
        with run.step("validate"):
            data = run.record(validate_task(config, ctx, str(project)))
            run.set_data(data)
        prepared = data.paths["prepared_dir"]
        with run.step("sft"):
            sft = run.record(sft_task(config, ctx, prepared))
        with run.step("reward"):
            rm = run.record(reward_task(config, ctx, prepared, sft.paths["model"]))
        with run.step("ppo"):
            ppo = run.record(ppo_task(config, ctx, prepared, sft.paths["model"], rm.paths["model"]))
        with run.step("evaluate"):
            ev = run.record(evaluate_task(config, ctx, prepared, sft, rm, ppo))
        run.log_headline(data, sft, rm, ppo, ev)

        if not register_models:
            run.summary.update(promotion={"promoted": False, "skipped": True,
                                          "reasons": ["registration disabled (a reproduction run)"]})
            return run.finish()
        with run.step("register"):
            registered = register_task(config, ctx, ppo.paths["model"], rm.paths["model"])
            run.summary.update(registered_models=registered)
        with run.step("promote"):
            if not config.promotion.enabled:
                promotion = {"promoted": False, "reasons": ["promotion disabled (promotion.enabled)"]}
            elif all(e.reused for e in registered):
                promotion = skipped_promotion(config, registered)
            else:
                promotion = promote_task(config, ctx, prepared, registered, rm, ev, ppo.paths["model"], str(project))
                if promotion.promoted:
                    for entry in registered:
                        entry.aliases = sorted({*entry.aliases, registry.CHAMPION})
            run.summary.update(promotion=promotion, registered_models=registered)
    except BaseException as exc:
        run.fail(exc)
        raise
    return run.finish()
