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


def _dvc_params_match(project: Path, config: Config) -> bool:
    """Whether the DVC ``prepare`` stage (which reads ``project/params.yaml``) would use this run's data section."""
    from flows.config import load_config

    params = project / "params.yaml"
    return params.exists() and load_config(params).data == config.data


def failure_file(config: Config) -> Path:
    """Where ``rlhf prepare`` writes the gate's failure message (outside the DVC output, which DVC clears)."""
    return Path(config.data.prepared_dir).parent / "validation_failure.txt"


def dvc_repro_prepare(project_dir: Path, config: Config) -> None:
    """``dvc repro prepare`` in ``project_dir`` (runs ``rlhf prepare`` only when its inputs changed).

    DVC runs as a subprocess in the project folder (its Python API resolves targets against the process's working
    directory), with this environment's ``python`` first on ``PATH`` for the stage's command.

    Raises:
        tasks.validate.ValidationFailed: when the prepare command failed its GX gate (the failure file it wrote is
            read back so the message names rows and expectations).
        RuntimeError: any other DVC failure, with DVC's own message.
    """
    from tasks.validate import ValidationFailed

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    failure = failure_file(config)
    failure.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=project_dir, env=env,
                          capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            print(line, file=sys.stderr)
    if proc.returncode != 0:
        if failure.exists():
            raise ValidationFailed(failure.read_text())
        raise RuntimeError(f"`dvc repro prepare` failed in {project_dir}: {proc.stderr.strip()[-2000:]}")


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(config: Config, project_dir: str, ctx: dict) -> dict:
    """Stage 0: the data gate (GX) and the data version. Fails the flow before any training on bad data."""
    from tasks.data import data_version

    logger = get_run_logger()
    project = Path(project_dir)
    params = {k: v for k, v in config.flat_params().items() if k.startswith("data.")}
    with tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], "validate", params, ctx["tags"]) as (run_id, _):
        start = time.time()
        if is_dvc_repo(project) and _dvc_params_match(project, config):
            logger.info("dvc repro prepare (DVC-versioned data in %s)", config.data.prepared_dir)
            dvc_repro_prepare(project, config)
        else:
            logger.warning("preparing the data without DVC versioning: %s", "the data section differs from "
                           f"{project / 'params.yaml'} (--config/--set)" if is_dvc_repo(project)
                           else f"{project} is not a DVC repository")
            prepare_data(config)
        prepared = Path(config.data.prepared_dir)
        version = data_version(prepared)
        report = json.loads((prepared / "report.json").read_text())
        counts = {name: report["counts"][name]["total"] for name in ("demonstrations", "comparisons", "prompts")}
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
    selection_rm = config.sft.selection_reward_model
    if selection_rm == "champion":
        from tasks.registry import download_model_dir

        selection_rm = download_model_dir(config.registry.reward_model_name, "champion",
                                          Path(ctx["output_dir"]) / "sft" / "champion-rm",
                                          required_tags={"rlhf.base_model": config.model.base})
        get_run_logger().info("SFT checkpoint selection by %s", f"the champion RM's mean score ({selection_rm})"
                              if selection_rm else "validation loss (no champion reward model yet)")

    def run(config, prepared_dir, base, out, log):
        return run_sft(config, prepared_dir, base, out, log, selection_reward_model=selection_rm)

    return _stage("sft", config, ctx, run, prepared_dir, base)


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
def evaluate_task(
    config: Config, prepared_dir: str, sft_model: str, policy: str, reward_model: str, ctx: dict,
    upstream: dict | None = None, judge_model: str | None = None,
) -> dict:
    """Stage 4: PPO vs SFT on held-out prompts under the reward model; the HTML report.

    ``upstream`` holds the earlier stages' metrics (``{stage: metrics}``) for the report.
    """
    from tasks.evaluate import run_evaluate

    rm = (upstream or {}).get("reward", {})

    def run(config, prepared_dir, sft_model, policy, reward_model, out, log):
        return run_evaluate(config, prepared_dir, sft_model, policy, reward_model, out, log,
                            judge_model_path=judge_model, judge_accuracy_ci=rm.get("judge_accuracy_ci"),
                            shorter_baseline=rm.get("accuracy_shorter_baseline"))

    result = _stage("evaluate", config, ctx, run, prepared_dir, sft_model, policy, reward_model)
    result["paths"]["report"] = _log_evaluation_extras(result, ctx, upstream or {})
    return result


def _log_evaluation_extras(result: dict, ctx: dict, upstream: dict) -> str:
    """On the evaluate run: the samples table, the PPO curves plot and the HTML report; a Prefect markdown artifact
    with the headline figures and where the report is. Returns the report's path."""
    import mlflow
    import pandas as pd

    from tasks.report import plot_ppo_curves, write_html_report

    out = Path(ctx["output_dir"])
    history_path = out / "ppo" / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    with tracking.reopen(result["mlflow_run_id"]):
        samples = pd.read_json(result["paths"]["samples"], lines=True)
        mlflow.log_table(samples, artifact_file="samples_table.json")
        if history:
            mlflow.log_artifact(str(plot_ppo_curves(history, out / "evaluate" / "ppo_curves.png")))
        report = write_html_report(out / "evaluate" / "report.html", {**upstream, "evaluate": result["metrics"]},
                                   history, samples.to_dict("records"))
        mlflow.log_artifact(str(report))
    _prefect_report_artifact(result, ctx, report)
    return str(report)


def _prefect_report_artifact(result: dict, ctx: dict, report: Path) -> None:
    from prefect.artifacts import create_markdown_artifact

    m = result["metrics"]
    low, high = m["win_rate_vs_sft_ci"]
    run = result["mlflow_run_id"]
    create_markdown_artifact(
        key="rlhf-evaluation",
        description="PPO vs SFT on held-out prompts",
        markdown=(
            "| metric | value |\n|---|---|\n"
            f"| win rate PPO vs SFT (RM) | {m['win_rate_vs_sft']:.3f} [{low:.3f}, {high:.3f}] |\n"
            f"| mean reward PPO / SFT | {m['mean_reward_policy']:.3f} / {m['mean_reward_sft']:.3f} |\n"
            f"| KL to SFT (nats) | {m['kl_to_sft']:.3f} |\n"
            + (f"| win rate PPO vs SFT (judge) | {m['win_rate_vs_sft_judge']:.3f} "
               f"[{m['win_rate_vs_sft_judge_ci'][0]:.3f}, {m['win_rate_vs_sft_judge_ci'][1]:.3f}] |\n\n"
               f"{m['judge_verdict']}\n\n" if "win_rate_vs_sft_judge" in m else "\n") +
            f"Report: MLflow run `{run}` (experiment {ctx['experiment_id']}), artifact `report.html`: "
            f"http://127.0.0.1:5000/#/experiments/{ctx['experiment_id']}/runs/{run} ; local copy `{report}`"
        ),
    )


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
    tags = {"rlhf.profile": config.profile, "rlhf.base_model": config.model.base, "rlhf.git_commit": git_commit(project),
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
                           rm["paths"]["model"], ctx,
                           {"reward": rm["metrics"], "ppo": ppo["metrics"]}, rm["paths"].get("judge"))
        summary.stage(current, "completed", ev["mlflow_run_id"], ev["metrics"])

        current = "register"
        summary.data["registered_models"] = register_task(config, ppo["paths"]["model"], rm["paths"]["model"], ctx)
        summary.write()
    except BaseException as exc:
        if current in summary.data["stages"]:
            summary.stage(current, "failed")
        summary.data["failed_stage"] = current
        summary.data["error"] = f"{type(exc).__name__}: {exc}"
        summary.write()
        tracking.end_run(parent, "FAILED")
        raise
    tracking.end_run(parent, "FINISHED")
    return summary.data


def _params_hash(config: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config.flat_params(), sort_keys=True).encode()).hexdigest()[:16]
