"""Running one stage: reuse an earlier run with the same cache key, or call the stage function inside a nested MLflow
run and record what it wrote.

The stage function gets exactly the configuration sections its :class:`~rlhf_pipeline.flows.stages.Stage` declares,
its typed inputs, its output folder and a metric logger; the runner logs its metrics and files, writes ``result.json``
(:attr:`~rlhf_pipeline.tasks.stage.StageDir.result`) and publishes the Prefect artifact ``rlhf-<stage>``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_pipeline.flows import artifacts, tracking
from rlhf_pipeline.flows.caching import check_digests, file_digests
from rlhf_pipeline.flows.config import Config
from rlhf_pipeline.flows.locks import gpu_slot
from rlhf_pipeline.flows.stages import STAGE, Stage
from rlhf_pipeline.flows.workers import run_stage_function
from rlhf_pipeline.tasks.stage import StageDir, StageResult, numeric_metrics


@dataclass
class RunContext:
    """What every task of one pipeline run shares (small and picklable: Prefect passes it to each task).

    Attributes:
        experiment_id, parent_run_id: the MLflow experiment and the flow's parent run.
        tags: tags set on every stage run (profile, base model, commit, data version...).
        output_dir: the run's folder (``runs/<profile>-<time>``); stage ``s`` writes to ``output_dir/s``.
        tracking_uri: the MLflow tracking URI (for links).
        use_cache: reuse stages whose inputs are unchanged.
        keys: ``{stage: cache key}``, filled once the data version is known.
    """

    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    output_dir: str
    tracking_uri: str
    use_cache: bool = True
    keys: dict[str, str] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> StageDir:
        """The output folder of ``stage`` in this run."""
        return StageDir(Path(self.output_dir) / stage)

    def link(self, run_id: str) -> str:
        """Markdown pointing at an MLflow run of this experiment."""
        return tracking.run_link(self.tracking_uri, self.experiment_id, run_id)


@dataclass
class StageOutcome:
    """What a stage's task returns to the flow.

    Attributes:
        stage: the stage's name.
        status: ``completed`` (it ran) or ``reused`` (an earlier run with the same key; ``mlflow_run_id`` and
            ``output_dir`` are that run's).
        paths: what the stage wrote (``model``, ``judge``, ``samples``...).
        metrics: its summary metrics.
        mlflow_run_id: the stage's MLflow run.
        output_dir: its output folder.
        cache_key: its cache key (``None`` for the data gate).
    """

    stage: str
    status: str
    paths: dict[str, str]
    metrics: dict
    mlflow_run_id: str
    output_dir: str
    cache_key: str | None = None

    def to_summary(self) -> dict:
        """The stage's entry in ``summary.json``."""
        entry = {"status": self.status, "mlflow_run_id": self.mlflow_run_id, "metrics": self.metrics,
                 "cache_key": self.cache_key, "paths": self.paths}
        if self.status == "reused":
            entry["reused_from"] = self.output_dir
        return entry


def stage_params(config: Config, stage: Stage) -> dict[str, str]:
    """The MLflow params of a stage run: the sections the stage reads."""
    prefixes = tuple(f"{section}." for section in stage.sections)
    return {k: v for k, v in config.flat_params().items() if k.startswith(prefixes)}


def find_reusable(experiment_id: str, stage: str, key: str, warn=None) -> StageOutcome | None:
    """The newest finished run of ``stage`` with cache key ``key`` whose outputs are still on disk and intact, as a
    ``reused`` outcome; ``None`` on a miss (no such run, its folder deleted or overwritten, a listed file missing, or a
    file that differs from the sha256 recorded in ``result.json`` when the stage finished: a truncated or corrupt
    model is re-trained, never handed to the next stage).

    Args:
        warn: called with a message naming the file when a run is passed over because its outputs changed.
    """
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`rlhf.cache_key` = '{key}' and tags.`rlhf.stage` = '{stage}' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        if run.data.tags.get("rlhf.reused_run_id"):
            continue  # a record of an earlier reuse; the original run is the one to point at
        folder = run.data.tags.get("rlhf.output_dir")
        if not folder:
            continue
        try:
            result = json.loads(StageDir(folder).result.read_text())
        except (OSError, ValueError):
            continue
        if result.get("cache_key") != key:
            continue
        paths = result.get("paths", {})
        if not all(Path(p).exists() for p in paths.values()):
            continue
        digests = result.get("digests")
        problem = (check_digests(digests, paths.values()) if digests is not None
                   else "its result.json records no file hashes (written before they were recorded)")
        if problem is not None:
            if warn is not None:
                warn(f"{stage}: not reusing MLflow run {run.info.run_id}: {problem}; the stage runs again")
            continue
        return StageOutcome(stage, "reused", paths, result["metrics"], run.info.run_id, folder, key)
    return None


def reuse(stage: Stage, config: Config, ctx: RunContext) -> StageOutcome | None:
    """The earlier run to reuse for ``stage`` (cache on and a hit), recorded under this flow's parent run: a short
    nested run pointing at the reused one, with its metrics, so the parent's tree keeps one child per stage and runs
    compare side by side; ``None`` when the stage must run."""
    if not (ctx.use_cache and stage.cached):
        return None
    from prefect import get_run_logger

    key = ctx.keys[stage.name]
    hit = find_reusable(ctx.experiment_id, stage.name, key, warn=get_run_logger().warning)
    if hit is None:
        return None
    import mlflow

    get_run_logger().info("%s: reusing MLflow run %s (inputs unchanged, cache key %s) from %s", stage.name,
                          hit.mlflow_run_id, key, hit.output_dir)
    tags = {**ctx.tags, "rlhf.cache_key": key, "rlhf.reused_run_id": hit.mlflow_run_id,
            "rlhf.output_dir": hit.output_dir}
    with tracking.stage_run(ctx.experiment_id, ctx.parent_run_id, stage.name, stage_params(config, stage), tags):
        mlflow.log_metrics(numeric_metrics(hit.metrics))
        mlflow.set_tag("mlflow.note.content", f"Reused: the inputs of this stage are unchanged since MLflow run "
                                              f"{hit.mlflow_run_id} (cache key {key}).")
    artifacts.stage_artifact(stage.name, "reused", hit.metrics, ctx.link(hit.mlflow_run_id),
                             f" (inputs unchanged; outputs in `{hit.output_dir}`)")
    return hit


def execute(stage: Stage, config: Config, ctx: RunContext, tags: dict[str, str] | None = None,
            **inputs) -> StageOutcome:
    """Run ``stage``'s function inside its nested MLflow run: ``fn(*sections, **inputs, output_dir=..., log=...)``,
    here or on ``distributed.workers`` Ray workers (:func:`rlhf_pipeline.flows.workers.run_stage_function`).

    The stage's metrics are logged on its run, ``result.json`` (paths, metrics, cache key) is written into its folder,
    and every file it lists is logged as an artifact. ``tags`` are added to the stage run.

    Raises:
        StageInputError: the stage failed and one of its input files differs from what its stage wrote (the message
            names the file and suggests ``--no-cache``).
        Exception: whatever else the stage raises (its MLflow run is then ``FAILED``).
    """
    import mlflow

    key = ctx.keys.get(stage.name)
    layout = ctx.stage_dir(stage.name)
    run_tags = {**ctx.tags, **(tags or {}), "rlhf.output_dir": str(layout.root)}
    if key:
        run_tags["rlhf.cache_key"] = key
    with tracking.stage_run(ctx.experiment_id, ctx.parent_run_id, stage.name, stage_params(config, stage),
                            run_tags) as (run_id, sink):
        with gpu_slot(config.model.device):
            try:
                result: StageResult = run_stage_function(stage, config, inputs, layout.root, sink, run_id,
                                                         ctx.tracking_uri)
            except Exception as exc:
                problem = damaged_input(inputs)
                if problem is None:
                    raise
                raise StageInputError(f"{stage.name} failed ({type(exc).__name__}: {exc}) on an input that is not what "
                                      f"its stage wrote: {problem}. `rlhf run --no-cache` re-runs every stage") from exc
        mlflow.log_metrics(numeric_metrics(result.metrics))
        save_result(layout, result, key)
        mlflow.log_artifact(str(layout.result))
        for path in result.paths.values():
            if Path(path).is_file():
                mlflow.log_artifact(path)
    artifacts.stage_artifact(stage.name, "completed", result.metrics, ctx.link(run_id))
    return StageOutcome(stage.name, "completed", result.paths, result.metrics, run_id, str(layout.root), key)


class StageInputError(RuntimeError):
    """A stage failed on an input file that differs from what the stage that wrote it recorded (a corrupt model...)."""


def damaged_input(inputs: dict) -> str | None:
    """The first input path (a stage's output: a folder or file beside that stage's ``result.json``) whose files no
    longer match the digests its stage recorded, as a message naming the file; ``None`` when every one matches or none
    can be checked."""
    for value in inputs.values():
        if not isinstance(value, str) or not value or not Path(value).exists():
            continue
        path = Path(value)
        for root in (path.parent, path.parent.parent):
            try:
                result = json.loads(StageDir(root).result.read_text())
            except (OSError, ValueError):
                continue
            digests = result.get("digests") or {}
            recorded = {f: d for f, d in digests.items() if f == str(path) or f.startswith(str(path) + "/")}
            if recorded:
                problem = check_digests(recorded, [value])
                if problem is not None:
                    return problem
            break
    return None


def run_stage(name: str, config: Config, ctx: RunContext, **inputs) -> StageOutcome:
    """Reuse ``name``'s earlier run when its inputs are unchanged, else :func:`execute` it."""
    stage = STAGE[name]
    return reuse(stage, config, ctx) or execute(stage, config, ctx, **inputs)


def save_result(layout: StageDir, result: StageResult, key: str | None) -> None:
    """``result.json``: what the stage wrote and its metrics, with the cache key and the sha256 of every file it
    lists (a later run checks both before reusing it). Written atomically."""
    layout.root.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    for path in result.paths.values():
        if Path(path).exists():
            digests.update(file_digests(path))
    payload = {"stage": result.stage, "cache_key": key, **asdict(result), "digests": digests}
    tmp = layout.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(layout.result)
