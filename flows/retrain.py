"""The Prefect flow ``rlhf-retrain``: scheduled retraining on new data.

On its cron schedule (``params.yaml`` ``retrain.cron``; the deployment in ``infra/prefect.yaml``) it

1. refreshes the data: ``dvc pull`` when the project has a DVC remote, then ``dvc repro prepare`` (ingestion + the GX
   gate; DVC skips it when the sources did not change);
2. computes the data version (content hash of the prepared datasets);
3. skips training when the last successful pipeline run of this profile had the same data version, parameters
   (params hash) and code version, and says so in the Prefect markdown artifact ``rlhf-retrain``;
4. otherwise runs ``rlhf-pipeline`` as a subflow (stages whose inputs are unchanged are reused, see
   :mod:`flows.caching`), whose promotion step gates the new challenger against the champion.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import tracking
from flows.config import Config


def has_dvc_remote(project: Path) -> bool:
    """Whether the DVC project has a remote configured (``dvc remote list`` prints one)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=project, capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


@task(name="refresh-data", cache_policy=NO_CACHE)
def refresh_data_task(config: Config, project_dir: str) -> dict:
    """``dvc pull`` (when a remote is configured) and ``dvc repro prepare``; the data version of the result.

    Raises:
        tasks.validate.ValidationFailed: new data failed the GX gate (nothing is trained or registered).
        RuntimeError: a DVC command failed (its message included).
    """
    from flows.pipeline import _dvc_params_match, dvc_env, dvc_repro_prepare, is_dvc_repo, prepare_data
    from tasks.data import data_version

    logger = get_run_logger()
    project = Path(project_dir)
    if is_dvc_repo(project) and _dvc_params_match(project, config):
        if has_dvc_remote(project):
            proc = subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=project, env=dvc_env(),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"`dvc pull` failed in {project}: {proc.stderr.strip()[-2000:]}")
            logger.info("dvc pull: %s", proc.stdout.strip()[-500:] or "up to date")
        dvc_repro_prepare(project, config)
    else:
        logger.warning("%s is not a DVC project with this data section; preparing without DVC", project)
        prepare_data(config)
    return {"version": data_version(Path(config.data.prepared_dir))}


def last_successful_run(config: Config, project: Path) -> dict | None:
    """The newest ``FINISHED`` pipeline parent run of ``config.profile`` in the experiment, as its tags, or ``None``."""
    from mlflow import MlflowClient

    experiment_id = tracking.setup_mlflow(project, config.registry.experiment)
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`rlhf.kind` = 'pipeline' and tags.`rlhf.profile` = '{config.profile}' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    return {"run_id": runs[0].info.run_id, **runs[0].data.tags}


@flow(name="rlhf-retrain")
def rlhf_retrain(
    profile: str = "demo",
    config_path: str = "params.yaml",
    project_dir: str = ".",
    output_dir: str | None = None,
    force: bool = False,
    overrides: list[str] | None = None,
) -> dict:
    """Refresh the data and retrain when something changed (see the module docstring).

    Returns:
        ``{"skipped": True, "reason", "data_version", "last_run"}`` when nothing changed, else the pipeline's summary
        with ``"skipped": False``.

    Raises:
        tasks.validate.ValidationFailed: the refreshed data failed the gate.
    """
    from prefect.artifacts import create_markdown_artifact

    from flows.caching import code_version
    from flows.config import load_config
    from flows.pipeline import _params_hash, rlhf_pipeline

    logger = get_run_logger()
    project = Path(project_dir).resolve()
    path = Path(config_path)
    config = load_config(path if path.is_absolute() else project / path, profile, overrides)
    data = refresh_data_task(config, str(project))
    fingerprint = {"rlhf.data_version": data["version"], "rlhf.params_hash": _params_hash(config),
                   "rlhf.code_version": code_version()}
    last = last_successful_run(config, project)
    unchanged = last is not None and all(last.get(k) == v for k, v in fingerprint.items())
    if unchanged and not force:
        reason = (f"nothing changed since the last successful run `{last['run_id']}`: data version "
                  f"`{data['version']}`, params hash `{fingerprint['rlhf.params_hash']}`, code version "
                  f"`{fingerprint['rlhf.code_version']}`")
        logger.info("skipping the retrain: %s", reason)
        create_markdown_artifact(key="rlhf-retrain", description="retrain skipped",
                                 markdown=f"**skipped**: {reason}. No stage ran, nothing was registered.\n")
        return {"skipped": True, "reason": reason, "data_version": data["version"], "last_run": last["run_id"]}
    changed = ["first run" if last is None else ", ".join(
        f"{k.split('.', 1)[1]} {last.get(k)} → {v}" for k, v in fingerprint.items() if last.get(k) != v) or "forced"]
    logger.info("retraining: %s", changed[0])
    summary = rlhf_pipeline(config=config, project_dir=str(project), output_dir=output_dir)
    promotion = summary.get("promotion") or {}
    create_markdown_artifact(
        key="rlhf-retrain",
        description="retrain ran",
        markdown=(f"**retrained** ({changed[0]}): data version `{data['version']}`, parent run "
                  f"`{summary['mlflow_parent_run_id']}`; promotion: "
                  f"{'promoted' if promotion.get('promoted') else 'not promoted'}\n\n"
                  + "\n".join(f"- {r}" for r in promotion.get("reasons", [])) + "\n"),
    )
    return {**summary, "skipped": False}
