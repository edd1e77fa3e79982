"""The Prefect flow ``rlhf-pipeline``: validate → SFT → reward model → PPO → evaluate → register → promote.

Each stage is a Prefect task wrapping the plain function ``tasks.<stage>.run_<stage>``; tasks pass paths, hashes and
small metric dicts, never models (design principle 2). Every task opens one nested MLflow run under the flow's parent
run and publishes a Prefect markdown artifact ``rlhf-<stage>`` (its metrics, the link to its MLflow run). A stage whose
inputs are unchanged is reused instead of re-run (:mod:`flows.caching`; ``"status": "reused"`` in the summary).
``DIR/summary.json`` is rewritten after every stage, so a failed run still says how far it got; nothing is registered
unless every stage before ``register`` succeeded, and ``champion`` moves only when the promotion gates pass
(:mod:`tasks.promotion`).
"""

from __future__ import annotations

import contextlib
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


def dvc_env() -> dict[str, str]:
    """The environment for DVC subprocesses: this interpreter's ``bin`` first on ``PATH`` (the stage's ``python``)."""
    return dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def stage_params(config: Config, stage: str) -> dict[str, str]:
    """The MLflow params of a stage run: its own section and the ``model`` section."""
    return {k: v for k, v in config.flat_params().items() if k.startswith((f"{stage}.", "model."))}


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

    env = dvc_env()
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


def _mlflow_run_link(ctx: dict, run_id: str) -> str:
    """Where a user opens a run: the MLflow server's page, or the command that starts a UI on a local store."""
    uri = ctx.get("tracking_uri", "")
    page = f"#/experiments/{ctx['experiment_id']}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"[MLflow run `{run_id}`]({uri.rstrip('/')}/{page})"
    return (f"MLflow run `{run_id}` (experiment {ctx['experiment_id']}); open it with `mlflow ui --host 127.0.0.1 "
            f"--backend-store-uri {uri}` then http://127.0.0.1:5000/{page}")


def _stage_artifact(stage: str, status: str, metrics: dict, run_id: str, ctx: dict, note: str = "") -> None:
    """A Prefect markdown artifact ``rlhf-<stage>``: the stage's metrics as a table and the link to its MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = str(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
        rows.append(f"| {key} | {str(value).replace('|', '/')} |")
    create_markdown_artifact(
        key=f"rlhf-{stage}",
        description=f"{stage}: {status}",
        markdown=f"**{stage}**: {status}{note}\n\n" + _mlflow_run_link(ctx, run_id) + "\n\n| metric | value |\n|---|---|\n"
                 + "\n".join(rows) + "\n",
    )


def _record_reuse(stage: str, hit: dict, config: Config, ctx: dict) -> None:
    """A short nested run under this flow's parent that points at the reused run (the parent's tree stays complete:
    one child per stage), with the reused metrics so runs compare side by side."""
    import mlflow

    params = stage_params(config, stage)
    tags = {**ctx["tags"], "rlhf.cache_key": ctx["keys"][stage], "rlhf.reused_run_id": hit["mlflow_run_id"],
            "rlhf.output_dir": hit["output_dir"]}
    with tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], stage, params, tags):
        mlflow.log_metrics({k: float(v) for k, v in hit["metrics"].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.set_tag("mlflow.note.content", f"Reused: the inputs of this stage are unchanged since MLflow run "
                                              f"{hit['mlflow_run_id']} (cache key {ctx['keys'][stage]}).")


@contextlib.contextmanager
def _gpu_slot(config: Config):
    """Hold a slot of the Prefect global concurrency limit ``gpu`` while a stage trains on CUDA (two training stages
    never share one GPU when workers share a Prefect server; no limit of that name, no wait)."""
    from models.loading import resolve_device

    if resolve_device(config.model.device).type != "cuda":
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency("gpu", occupy=1, strict=False):
        yield


def _stage(stage: str, config: Config, ctx: dict, fn, *args) -> dict:
    """Run ``fn(config, *args, output_dir, log)`` inside the stage's nested MLflow run, or reuse an earlier run of the
    stage with the same cache key (:mod:`flows.caching`).

    Returns:
        ``{"paths", "metrics", "mlflow_run_id", "output_dir", "status", "cache_key"}``; ``status`` is ``completed`` or
        ``reused`` (then ``mlflow_run_id`` is the reused run).
    """
    import mlflow

    from flows.caching import find_reusable

    key = ctx["keys"][stage]
    if ctx.get("use_cache", True):
        hit = find_reusable(ctx["experiment_id"], stage, key)
        if hit is not None:
            get_run_logger().info("%s: reusing MLflow run %s (inputs unchanged, cache key %s) from %s", stage,
                                  hit["mlflow_run_id"], key, hit["output_dir"])
            _record_reuse(stage, hit, config, ctx)
            _stage_artifact(stage, "reused", hit["metrics"], hit["mlflow_run_id"], ctx,
                            f" (inputs unchanged; outputs in `{hit['output_dir']}`)")
            return {**hit, "status": "reused", "cache_key": key}
    params = stage_params(config, stage)
    out = Path(ctx["output_dir"]) / stage
    tags = {**ctx["tags"], "rlhf.cache_key": key, "rlhf.output_dir": str(out)}
    with tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], stage, params, tags) as (run_id, sink):
        with _gpu_slot(config):
            result = fn(config, *args, out, sink)
        scalars = {k: float(v) for k, v in result.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(scalars)
        out.mkdir(parents=True, exist_ok=True)
        _save_result(out, result.paths, result.metrics, key)
        mlflow.log_artifact(str(out / "result.json"))
        for path in result.paths.values():
            if Path(path).is_file():
                mlflow.log_artifact(path)
    _stage_artifact(stage, "completed", result.metrics, run_id, ctx)
    return {"paths": result.paths, "metrics": result.metrics, "mlflow_run_id": run_id, "output_dir": str(out),
            "status": "completed", "cache_key": key}


def _save_result(out: Path, paths: dict, metrics: dict, key: str) -> None:
    """``out/result.json``: what the stage wrote and its metrics, with the cache key a later run checks on reuse."""
    (out / "result.json").write_text(json.dumps({"stage": out.name, "cache_key": key, "paths": paths,
                                                 "metrics": metrics}, indent=2, default=str))


@task(name="sft", cache_policy=NO_CACHE)
def sft_task(config: Config, prepared_dir: str, ctx: dict) -> dict:
    """Stage 1: supervised fine-tuning (InstructGPT §3.5)."""
    from models.loading import resolve_model_path
    from tasks.sft import run_sft

    base = resolve_model_path(config.model.base, config.model.cache_dir)

    def run(config, prepared_dir, base, out, log):
        selection_rm, used = config.sft.selection_reward_model, None
        if selection_rm and (selection_rm == "champion" or selection_rm.startswith("models:/")):
            import mlflow

            from tasks.promotion import champion_version
            from tasks.registry import download_model_dir, parse_model_ref

            name, ref = ((config.registry.reward_model_name, "champion") if selection_rm == "champion"
                         else parse_model_ref(selection_rm))
            version = champion_version(name) if ref == "champion" else int(ref)
            selection_rm = None
            if version is not None:
                selection_rm = download_model_dir(name, str(version), out / "selection-rm",
                                                  required_tags={"rlhf.base_model": config.model.base})
            if selection_rm is not None:
                used = f"models:/{name}/{version}"
                mlflow.set_tag("rlhf.selection_reward_model", used)  # lineage: reproduce with the same RM
            get_run_logger().info("SFT checkpoint selection by %s", f"the mean score of {used} ({ref})"
                                  if used else "validation loss (no champion reward model yet)")
        result = run_sft(config, prepared_dir, base, out, log, selection_reward_model=selection_rm)
        if used:
            result.metrics["selection_reward_model"] = used
        return result

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
    upstream: dict | None = None, judge_model: str | None = None, ppo_dir: str | None = None,
) -> dict:
    """Stage 4: PPO vs SFT on held-out prompts under the reward model and the judge; the HTML report.

    ``upstream`` holds the earlier stages' metrics (``{stage: metrics}``) for the report; ``ppo_dir`` is the PPO
    stage's output folder (its ``history.json`` gives the curves).
    """
    from tasks.evaluate import run_evaluate

    rm = (upstream or {}).get("reward", {})

    def run(config, prepared_dir, sft_model, policy, reward_model, out, log):
        result = run_evaluate(config, prepared_dir, sft_model, policy, reward_model, out, log,
                              judge_model_path=judge_model, judge_accuracy_ci=rm.get("judge_accuracy_ci"),
                              shorter_baseline=rm.get("accuracy_shorter_baseline"))
        result.paths["report"] = str(out / "report.html")  # written right after, in _log_evaluation_extras
        return result

    result = _stage("evaluate", config, ctx, run, prepared_dir, sft_model, policy, reward_model)
    if result["status"] == "completed":
        _log_evaluation_extras(result, ctx, upstream or {}, Path(ppo_dir) if ppo_dir else None)
    return result


def _log_evaluation_extras(result: dict, ctx: dict, upstream: dict, ppo_dir: Path | None) -> str:
    """On the evaluate run: the samples table, the PPO curves plot and the HTML report; a Prefect markdown artifact
    with the headline figures and where the report is. Returns the report's path."""
    import mlflow
    import pandas as pd

    from tasks.report import plot_ppo_curves, write_html_report

    out = Path(result["output_dir"])
    history_path = (ppo_dir or Path(ctx["output_dir"]) / "ppo") / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    with tracking.reopen(result["mlflow_run_id"]):
        samples = pd.read_json(result["paths"]["samples"], lines=True)
        mlflow.log_table(samples, artifact_file="samples_table.json")
        if history:
            mlflow.log_artifact(str(plot_ppo_curves(history, out / "ppo_curves.png")))
        report = write_html_report(Path(result["paths"]["report"]), {**upstream, "evaluate": result["metrics"]},
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
            f"Report: artifact `report.html` of {_mlflow_run_link(ctx, run)}; local copy `{report}`"
        ),
    )


@task(name="register", cache_policy=NO_CACHE)
def register_task(config: Config, policy: str, reward_model: str, ctx: dict) -> list[dict]:
    """Log the final policy and reward model and register them as ``challenger`` (the policy version records the
    reward model version of the same run). When PPO was reused and its policy is registered already, nothing new is
    registered and the existing versions are returned with ``"reused": True``."""
    from tasks.registry import find_registered, log_and_register

    names = (config.registry.reward_model_name, config.registry.policy_name)
    ppo_key = ctx["keys"]["ppo"]
    existing = find_registered(names[1], "rlhf.ppo_cache_key", ppo_key)
    if existing is not None:
        from mlflow import MlflowClient

        client = MlflowClient()
        entries = [existing]
        rm_version = client.get_model_version(names[1], str(existing["version"])).tags.get("rlhf.reward_model_version")
        if rm_version:
            rm = client.get_model_version(names[0], rm_version)
            entries.insert(0, {"name": names[0], "version": int(rm.version), "aliases": sorted(rm.aliases)})
        get_run_logger().info("the policy of PPO cache key %s is registered already (%s version %s): nothing new "
                              "to register", ppo_key, names[1], existing["version"])
        return [{**e, "reused": True} for e in entries]
    tags = {**ctx["tags"], "rlhf.mlflow_parent_run_id": ctx["parent_run_id"], "rlhf.ppo_cache_key": ppo_key,
            "rlhf.reward_cache_key": ctx["keys"]["reward"], "rlhf.sft_cache_key": ctx["keys"]["sft"]}
    with tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], "register", {}, ctx["tags"]):
        rm = log_and_register(reward_model, "reward_model", names[0], tags)
        policy_entry = log_and_register(policy, "policy", names[1],
                                        {**tags, "rlhf.reward_model_version": str(rm["version"])})
    return [{k: v for k, v in entry.items() if k != "model_uri"} for entry in (rm, policy_entry)]


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(config: Config, prepared_dir: str, registered: list[dict], policy: str, reward_metrics: dict,
                 evaluate_metrics: dict, judge_model: str | None, ctx: dict, project_dir: str) -> dict:
    """Gate the challenger against the champion (:mod:`tasks.promotion`) and move ``champion`` when every gate passes.

    Writes the decision as model-version tags, a nested MLflow run ``promote`` and the Prefect markdown artifact
    ``rlhf-promotion``. Returns the decision as a dict (``promoted``, ``reasons``, ``figures``, versions).
    """
    from prefect.artifacts import create_markdown_artifact

    from tasks.promotion import (
        Decision, apply_decision, champion_version, check_gates, decision_markdown, promotion_lock,
        win_rate_vs_champion,
    )
    from tasks.registry import download_model_dir

    logger = get_run_logger()
    names = {e["name"]: e for e in registered}
    policy_name, rm_name = config.registry.policy_name, config.registry.reward_model_name
    challenger = names[policy_name]["version"]
    figures: dict = {"kl_to_sft": evaluate_metrics.get("kl_to_sft"), "reward_accuracy": reward_metrics.get("accuracy"),
                     "judge_informative": bool(evaluate_metrics.get("judge_informative"))}
    with promotion_lock(project_dir), tracking.stage_run(ctx["experiment_id"], ctx["parent_run_id"], "promote", {},
                                                          ctx["tags"]):
        import mlflow

        champion = champion_version(policy_name)
        figures["has_champion"] = champion is not None
        if champion is not None:
            judge = judge_model or ctx["reward_model"]
            figures["judge"] = "judge RM" if judge_model else "training RM (no judge in this run)"
            champion_dir = download_model_dir(policy_name, "champion", Path(ctx["output_dir"]) / "promote" / "champion")
            try:
                if champion_dir is None:
                    raise ValueError(f"{policy_name}@champion has no model folder")
                figures.update(win_rate_vs_champion(config, prepared_dir, policy, champion_dir, judge))
            except ValueError as exc:  # e.g. a champion on another tokenizer: the win-rate gate fails, saying why
                figures["win_rate_vs_champion"] = None
                figures["comparison_error"] = str(exc)
        passed, reasons = check_gates(figures, config.promotion)
        decision = Decision(passed, reasons, figures, champion_version=challenger if passed else champion,
                            challenger_version=challenger, previous_champion=champion)
        apply_decision(decision, policy_name, rm_name, names[rm_name]["version"])
        mlflow.log_metrics({f"promotion/{k}": float(v) for k, v in figures.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.set_tags({"rlhf.promotion.decision": "promoted" if passed else "rejected",
                         "rlhf.promotion.challenger_version": str(challenger)})
    logger.info("promotion of %s version %s: %s\n%s", policy_name, challenger,
                "promoted" if passed else "not promoted", "\n".join(reasons))
    create_markdown_artifact(key="rlhf-promotion", description="champion/challenger decision",
                             markdown=decision_markdown(decision, policy_name))
    return decision.to_dict()


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
        tasks.validate.ValidationFailed: the data gate failed (no training ran, nothing registered).
        Exception: any stage's error; the summary marks the stage ``failed`` and the MLflow runs ``FAILED``.
    """
    from prefect.runtime import flow_run

    from flows.caching import code_version, stage_key
    from flows.config import load_config

    project = Path(project_dir).resolve()
    if config is None:
        path = Path(config_path)
        config = load_config(path if path.is_absolute() else project / path, profile, overrides)
    out = Path(output_dir or f"runs/{config.profile}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not out.is_absolute():
        out = project / out
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(out / "summary.json")
    experiment_id = tracking.setup_mlflow(project, config.registry.experiment)
    flow_run_id = str(flow_run.id) if flow_run.id else None
    tags = {"rlhf.profile": config.profile, "rlhf.base_model": config.model.base, "rlhf.git_commit": git_commit(project),
            "rlhf.prefect_flow_run_id": flow_run_id or "", "rlhf.params_hash": _params_hash(config),
            "rlhf.code_version": code_version()}
    parent = tracking.start_parent_run(experiment_id, f"rlhf-{config.profile}", config.flat_params(),
                                       {**tags, "rlhf.kind": "pipeline"})
    _log_config(parent, config)
    summary.data.update(mlflow_parent_run_id=parent, prefect_flow_run_id=flow_run_id, output_dir=str(out),
                        tracking_uri=tracking.tracking_uri(project), profile=config.profile, promotion=None)
    summary.write()
    use_cache = use_cache and config.cache.enabled
    ctx = {"experiment_id": experiment_id, "parent_run_id": parent, "tags": tags, "output_dir": str(out),
           "tracking_uri": tracking.tracking_uri(project), "use_cache": use_cache, "keys": {}}
    current = "validate"

    def record(name: str, result: dict) -> None:
        summary.stage(name, result.get("status", "completed"), result["mlflow_run_id"], result["metrics"])
        summary.data["stages"][name]["cache_key"] = result.get("cache_key")
        if result.get("status") == "reused":
            summary.data["stages"][name]["reused_from"] = result["output_dir"]
        summary.data["stages"][name]["paths"] = result.get("paths", {})
        summary.write()

    try:
        summary.stage("validate", "running")
        data = validate_task(config, str(project), ctx)
        summary.data["data"] = {"version": data["version"], **data["counts"]}
        tags["rlhf.data_version"] = data["version"]
        from mlflow import MlflowClient

        MlflowClient().set_tag(parent, "rlhf.data_version", data["version"])
        summary.stage("validate", "completed", data["mlflow_run_id"], data["metrics"])
        _stage_artifact("validate", "completed", data["metrics"], data["mlflow_run_id"], ctx,
                        f" (data version `{data['version']}`)")
        keys = ctx["keys"]
        for name in ("sft", "reward", "ppo", "evaluate"):
            keys[name] = stage_key(name, config, data["version"], keys)

        current = "sft"
        summary.stage(current, "running")
        sft = sft_task(config, data["prepared_dir"], ctx)
        record(current, sft)

        current = "reward"
        summary.stage(current, "running")
        rm = reward_task(config, data["prepared_dir"], sft["paths"]["model"], ctx)
        record(current, rm)

        current = "ppo"
        summary.stage(current, "running")
        ppo = ppo_task(config, data["prepared_dir"], sft["paths"]["model"], rm["paths"]["model"], ctx)
        record(current, ppo)

        current = "evaluate"
        summary.stage(current, "running")
        ev = evaluate_task(config, data["prepared_dir"], sft["paths"]["model"], ppo["paths"]["model"],
                           rm["paths"]["model"], ctx,
                           {"reward": rm["metrics"], "ppo": ppo["metrics"]}, rm["paths"].get("judge"),
                           ppo["output_dir"])
        record(current, ev)
        _log_headline(parent, rm["metrics"], ppo["metrics"], ev["metrics"])

        current = "register"
        if not register_models:
            summary.data["promotion"] = {"promoted": False, "skipped": True,
                                         "reasons": ["registration disabled (a reproduction run)"]}
            summary.write()
            tracking.end_run(parent, "FINISHED")
            return summary.data
        registered = register_task(config, ppo["paths"]["model"], rm["paths"]["model"], ctx)
        summary.data["registered_models"] = registered
        summary.write()

        current = "promote"
        if not config.promotion.enabled:
            summary.data["promotion"] = {"promoted": False, "reasons": ["promotion disabled (promotion.enabled)"]}
        elif all(e.get("reused") for e in registered):
            champion = _champion_or_none(config.registry.policy_name)
            summary.data["promotion"] = {
                "promoted": False, "skipped": True,
                "reasons": ["this policy was registered and judged by an earlier run; no new challenger"],
                "champion_version": champion,
            }
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(
                key="rlhf-promotion", description="champion/challenger decision",
                markdown=f"**skipped**: `{config.registry.policy_name}` version {registered[-1]['version']} was "
                         f"registered and judged by an earlier run; no new challenger. Champion: version {champion}.\n")
        else:
            summary.data["promotion"] = promote_task(
                config, data["prepared_dir"], registered, ppo["paths"]["model"], rm["metrics"], ev["metrics"],
                rm["paths"].get("judge"), {**ctx, "reward_model": rm["paths"]["model"]}, str(project))
            if summary.data["promotion"]["promoted"]:
                for entry in registered:
                    entry["aliases"] = sorted({*entry["aliases"], "champion"})
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


HEADLINE = {"reward": ("accuracy", "judge_accuracy"), "ppo": ("kl", "mean_reward"),
            "evaluate": ("win_rate_vs_sft", "win_rate_vs_sft_judge", "kl_to_sft", "ppl_sft", "ppl_policy")}


def _log_headline(parent_run_id: str, *stage_metrics: dict) -> None:
    """The figures people compare across runs, on the parent run too (``reward.accuracy``, ``evaluate.kl_to_sft``...),
    so the MLflow runs table shows them without opening the stage runs."""
    import time as _time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(_time.time() * 1000)
    metrics = [Metric(f"{stage}.{key}", float(values[key]), now, 0)
               for (stage, keys), values in zip(HEADLINE.items(), stage_metrics) for key in keys
               if isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool)]
    MlflowClient().log_batch(parent_run_id, metrics=metrics)


def _champion_or_none(name: str) -> int | None:
    from tasks.promotion import champion_version

    return champion_version(name)


def _log_config(run_id: str, config: Config) -> None:
    """The resolved configuration as the parent run's artifact ``config.json`` (what ``rlhf lineage --reproduce``
    re-runs)."""
    from mlflow import MlflowClient

    MlflowClient().log_dict(run_id, config.model_dump(mode="json"), "config.json")


def _params_hash(config: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config.flat_params(), sort_keys=True).encode()).hexdigest()[:16]
