"""The Prefect flow ``rlhf-pipeline``: validate → SFT → reward model → PPO → evaluate → register.

Each stage is a Prefect task wrapping the plain function ``tasks.<stage>.run_<stage>``; tasks pass paths, hashes and
small metric dicts, never models (design principle 2). Every task opens one nested MLflow run under the flow's parent
run. ``DIR/summary.json`` is rewritten after every stage, so a failed run still says how far it got; nothing is
registered unless every stage before ``register`` succeeded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import tracking
from flows.config import Config

STAGES = ("validate", "sft", "reward", "ppo", "evaluate")


class Summary:
    """``DIR/summary.json``: the run's data version, run ids, per-stage status/metrics and registered models."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {
            "data": {},
            "mlflow_parent_run_id": None,
            "prefect_flow_run_id": None,
            "stages": {s: {"status": "pending", "mlflow_run_id": None, "metrics": {}} for s in STAGES},
            "registered_models": [],
        }

    def stage(self, name: str, status: str, run_id: str | None = None, metrics: dict | None = None) -> None:
        entry = self.data["stages"].setdefault(name, {"status": "pending", "mlflow_run_id": None, "metrics": {}})
        entry["status"] = status
        if run_id:
            entry["mlflow_run_id"] = run_id
        if metrics is not None:
            entry["metrics"] = metrics
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def git_commit(project_dir: Path) -> str:
    """``HEAD``'s commit of the project (``+dirty`` when the work tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def is_dvc_repo(project_dir: Path) -> bool:
    return (project_dir / ".dvc").is_dir() and (project_dir / "dvc.yaml").exists()


def token_counter(config: Config):
    """Count tokens with the configured model's tokenizer (for the GX length expectations)."""
    from models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(config.model.base, config.model.cache_dir))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare_data(config: Config, strict: bool = False) -> dict:
    """Ingest + GX gate + write the prepared datasets (what ``rlhf prepare`` / the DVC ``prepare`` stage run)."""
    from tasks.validate import run_validate

    return run_validate(config.data, count_tokens=token_counter(config), prepared_dir=config.data.prepared_dir,
                        strict=strict)


def failure_file(config: Config) -> Path:
    """Where ``rlhf prepare`` writes the gate's failure message (outside the DVC output, which DVC clears)."""
    return Path(config.data.prepared_dir).parent / "validation_failure.txt"


def dvc_repro_prepare(project_dir: Path, config: Config) -> None:
    """``dvc repro prepare`` in ``project_dir`` (runs ``rlhf prepare`` only when its inputs changed).

    Raises:
        tasks.validate.ValidationFailed: when the prepare command failed its GX gate (the failure file it wrote is
            read back so the message names rows and expectations).
        RuntimeError: any other DVC failure.
    """
    from dvc.repo import Repo

    from tasks.validate import ValidationFailed

    env_path = os.environ.get("PATH", "")
    bin_dir = str(Path(sys.executable).parent)
    if not env_path.startswith(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + env_path  # the stage's `python` is this environment's
    failure = failure_file(config)
    failure.unlink(missing_ok=True)
    try:
        with Repo(str(project_dir)) as repo:
            repo.reproduce("prepare")
    except Exception as exc:  # DVC wraps the command's failure
        if failure.exists():
            raise ValidationFailed(failure.read_text()) from None
        raise RuntimeError(f"`dvc repro prepare` failed in {project_dir}: {exc}") from exc


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(config: Config, project_dir: str, ctx: dict) -> dict:
    """Stage 0: the data gate (GX) and the data version. Fails the flow before any training on bad data."""
    from tasks.data import data_version, load_prepared

    logger = get_run_logger()
    project = Path(project_dir)
    params = {f"data.{k}": v for k, v in config.flat_params().items() if k.startswith("data.")}
    with tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], "validate", params, ctx["tags"]) as (run_id, _):
        start = time.time()
        if is_dvc_repo(project):
            logger.info("dvc repro prepare (DVC-versioned data in %s)", config.data.prepared_dir)
            dvc_repro_prepare(project, config)
        else:
            logger.warning("%s is not a DVC repository: preparing the data without DVC versioning", project)
            prepare_data(config)
        prepared = Path(config.data.prepared_dir)
        version = data_version(prepared)
        report = json.loads((prepared / "report.json").read_text())
        counts = {name: len(load_prepared(prepared, name)) for name in ("demonstrations", "comparisons", "prompts")}
        import mlflow

        dropped = report.get("dropped", [])
        metrics = {**{f"rows_{k}": float(v) for k, v in counts.items()}, "dropped_rows": float(len(dropped)),
                   "wall_s": time.time() - start}
        mlflow.log_metrics(metrics)
        mlflow.set_tag("data_version", version)
        mlflow.log_artifact(str(prepared / "report.json"), artifact_path="validation")
        _log_dataset_inputs(prepared, version)
        logger.info("data version %s: %s; %d malformed rows dropped (see %s)", version, counts, len(dropped),
                    prepared / "report.json")
    return {"version": version, "counts": counts, "prepared_dir": str(prepared), "mlflow_run_id": run_id,
            "metrics": metrics}


def _log_dataset_inputs(prepared: Path, version: str) -> None:
    import mlflow
    import mlflow.data

    from tasks.data import load_prepared

    for name in ("demonstrations", "comparisons", "prompts"):
        frame = load_prepared(prepared, name)[["id", "split", "source"]]
        dataset = mlflow.data.from_pandas(frame, source=str(prepared / f"{name}.parquet"), name=name, digest=version)
        mlflow.log_input(dataset, context=name)


def _stage(stage: str, config: Config, ctx: dict, fn, *args) -> dict:
    """Run ``fn(config, *args, output_dir, log)`` inside the stage's nested MLflow run; log its metrics and result."""
    import mlflow

    params = {k: v for k, v in config.flat_params().items() if k.startswith((f"{stage}.", "model."))}
    out = Path(ctx["output_dir"]) / stage
    with tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], stage, params, ctx["tags"]) as (run_id, sink):
        result = fn(config, *args, out, sink)
        scalars = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(scalars)
        out.mkdir(parents=True, exist_ok=True)
        result.save(out / "result.json")
        mlflow.log_artifact(str(out / "result.json"))
        for path in result.paths.values():
            if Path(path).is_file():
                mlflow.log_artifact(path)
    return {"paths": result.paths, "metrics": result.metrics, "mlflow_run_id": run_id}


@task(name="sft", cache_policy=NO_CACHE)
def sft_task(config: Config, prepared_dir: str, ctx: dict) -> dict:
    """Stage 1: supervised fine-tuning (InstructGPT §3.5)."""
    from models.loading import resolve_model_path
    from tasks.sft import run_sft

    base = resolve_model_path(config.model.base, config.model.cache_dir)
    return _stage("sft", config, ctx, run_sft, prepared_dir, base)


@task(name="reward", cache_policy=NO_CACHE)
def reward_task(config: Config, prepared_dir: str, sft_model: str, ctx: dict) -> dict:
    """Stage 2: reward model from the SFT model (InstructGPT §3.5)."""
    from tasks.reward import run_reward

    return _stage("reward", config, ctx, run_reward, prepared_dir, sft_model)


@task(name="ppo", cache_policy=NO_CACHE)
def ppo_task(config: Config, prepared_dir: str, sft_model: str, reward_model: str, ctx: dict) -> dict:
    """Stage 3: PPO with the per-token KL penalty (InstructGPT §3.5)."""
    from tasks.ppo import run_ppo

    return _stage("ppo", config, ctx, run_ppo, prepared_dir, sft_model, reward_model)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: Config, prepared_dir: str, sft_model: str, policy: str, reward_model: str, ctx: dict) -> dict:
    """Stage 4: PPO vs SFT on held-out prompts under the reward model."""
    from tasks.evaluate import run_evaluate

    result = _stage("evaluate", config, ctx, run_evaluate, prepared_dir, sft_model, policy, reward_model)
    _log_evaluation_extras(result, ctx)
    return result


def _log_evaluation_extras(result: dict, ctx: dict) -> None:
    """The samples table and the PPO curves plot, on the evaluate run."""
    import mlflow
    import pandas as pd

    from tasks.report import plot_ppo_curves

    with tracking.reopen(result["mlflow_run_id"]):
        samples = pd.read_json(result["paths"]["samples"], lines=True)
        mlflow.log_table(samples, artifact_file="samples_table.json")
        history = Path(ctx["output_dir"]) / "ppo" / "history.json"
        if history.exists():
            png = Path(ctx["output_dir"]) / "evaluate" / "ppo_curves.png"
            plot_ppo_curves(json.loads(history.read_text()), png)
            mlflow.log_artifact(str(png))


@task(name="register", cache_policy=NO_CACHE)
def register_task(config: Config, policy: str, reward_model: str, ctx: dict) -> list[dict]:
    """Log the final policy and reward model and register them (alias ``challenger``; ``champion`` on the first)."""
    from tasks.registry import log_and_register

    with tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], "register", {}, ctx["tags"]):
        return [
            {k: v for k, v in log_and_register(reward_model, "reward_model", config.registry.reward_model_name,
                                               ctx["tags"]).items() if k != "model_uri"},
            {k: v for k, v in log_and_register(policy, "policy", config.registry.policy_name,
                                               ctx["tags"]).items() if k != "model_uri"},
        ]


@flow(name="rlhf-pipeline")
def rlhf_pipeline(config: Config, project_dir: str = ".", output_dir: str = "runs/latest") -> dict:
    """The InstructGPT recipe end to end. Writes ``output_dir/summary.json`` and returns its content.

    Raises:
        tasks.validate.ValidationFailed: the data gate failed (no training ran, nothing registered).
        Exception: any stage's error; the summary marks the stage ``failed`` and the MLflow runs ``FAILED``.
    """
    from prefect.runtime import flow_run

    project = Path(project_dir).resolve()
    out = Path(output_dir)
    if not out.is_absolute():
        out = project / out
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(out / "summary.json")
    experiment_id = tracking.setup_mlflow(project, config.registry.experiment)
    flow_run_id = str(flow_run.id) if flow_run.id else None
    tags = {"rlhf.profile": config.profile, "rlhf.git_commit": git_commit(project),
            "rlhf.prefect_flow_run_id": flow_run_id or "", "rlhf.params_hash": _params_hash(config)}
    parent = tracking.start_parent_run(experiment_id, f"rlhf-{config.profile}", config.flat_params(), tags)
    summary.data.update(mlflow_parent_run_id=parent, prefect_flow_run_id=flow_run_id, output_dir=str(out),
                        tracking_uri=tracking.tracking_uri(project))
    summary.write()
    ctx = {"experiment_id": experiment_id, "parent_run_id": parent, "tags": tags, "output_dir": str(out)}
    current = "validate"
    try:
        summary.stage("validate", "running")
        data = validate_task(config, str(project), ctx)
        summary.data["data"] = {"version": data["version"], **data["counts"]}
        tags["rlhf.data_version"] = data["version"]
        from mlflow import MlflowClient

        MlflowClient().set_tag(parent, "rlhf.data_version", data["version"])
        summary.stage("validate", "completed", data["mlflow_run_id"], data["metrics"])

        current = "sft"
        summary.stage(current, "running")
        sft = sft_task(config, data["prepared_dir"], ctx)
        summary.stage(current, "completed", sft["mlflow_run_id"], sft["metrics"])

        current = "reward"
        summary.stage(current, "running")
        rm = reward_task(config, data["prepared_dir"], sft["paths"]["model"], ctx)
        summary.stage(current, "completed", rm["mlflow_run_id"], rm["metrics"])

        current = "ppo"
        summary.stage(current, "running")
        ppo = ppo_task(config, data["prepared_dir"], sft["paths"]["model"], rm["paths"]["model"], ctx)
        summary.stage(current, "completed", ppo["mlflow_run_id"], ppo["metrics"])

        current = "evaluate"
        summary.stage(current, "running")
        ev = evaluate_task(config, data["prepared_dir"], sft["paths"]["model"], ppo["paths"]["model"],
                           rm["paths"]["model"], ctx)
        summary.stage(current, "completed", ev["mlflow_run_id"], ev["metrics"])

        current = "register"
        summary.data["registered_models"] = register_task(config, ppo["paths"]["model"], rm["paths"]["model"], ctx)
        summary.write()
    except BaseException:
        if current in summary.data["stages"]:
            summary.stage(current, "failed")
        summary.data["failed_stage"] = current
        summary.write()
        tracking.end_run(parent, "FAILED")
        raise
    tracking.end_run(parent, "FINISHED")
    return summary.data


def _params_hash(config: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config.flat_params(), sort_keys=True).encode()).hexdigest()[:16]
