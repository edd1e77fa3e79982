"""The Prefect flow ``rlhf-retrain``: scheduled retraining on new data.

On its cron schedule (``params.yaml`` ``retrain.cron``; the deployment in ``infra/prefect.yaml``) it

1. refreshes the data: ``dvc pull`` when the project has a DVC remote, then ``dvc repro prepare`` (ingestion + the GX
   gate; DVC skips it when the sources did not change);
2. computes the data version (content hash of the prepared datasets);
3. skips training when the last successful pipeline run of this profile had the same data version, parameters
   (params hash) and code version, and says so in the Prefect markdown artifact ``rlhf-retrain``;
4. otherwise runs ``rlhf-pipeline`` as a subflow (stages whose inputs are unchanged are reused, see
   :mod:`rlhf_pipeline.flows.runner`), whose promotion step gates the new challenger against the champion.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rlhf_pipeline.flows import artifacts, dvc, tracking
from rlhf_pipeline.flows.caching import code_version
from rlhf_pipeline.flows.config import Config, load_config
from rlhf_pipeline.flows.pipeline import rlhf_pipeline


@task(name="refresh-data", cache_policy=NO_CACHE)
def refresh_data_task(config: Config, project_dir: str) -> str:
    """``dvc pull`` (when a remote is configured) and ``dvc repro prepare`` under the data lock; returns the data
    version of the result.

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: new data failed the GX gate (nothing is trained or registered;
            the last good version is kept).
        rlhf_pipeline.tasks.readers.DataError: a source could not be read (likewise).
        RuntimeError: a DVC command failed (its message included).
    """
    logger = get_run_logger()
    return dvc.prepare_version(Path(project_dir), config, pull=True, log=logger.info).name


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
        rlhf_pipeline.tasks.validate.ValidationFailed: the refreshed data failed the gate.
    """
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    path = Path(config_path)
    config = load_config(path if path.is_absolute() else project / path, profile, overrides)
    version = refresh_data_task(config, str(project))
    fingerprint = {"rlhf.data_version": version, "rlhf.params_hash": config.params_hash(),
                   "rlhf.code_version": code_version()}
    last = last_successful_run(config, project)
    unchanged = last is not None and all(last.get(k) == v for k, v in fingerprint.items())
    if unchanged and not force:
        reason = (f"nothing changed since the last successful run `{last['run_id']}`: data version "
                  f"`{version}`, params hash `{fingerprint['rlhf.params_hash']}`, code version "
                  f"`{fingerprint['rlhf.code_version']}`")
        logger.info("skipping the retrain: %s", reason)
        artifacts.retrain_artifact(True, f"**skipped**: {reason}. No stage ran, nothing was registered.\n")
        return {"skipped": True, "reason": reason, "data_version": version, "last_run": last["run_id"]}
    changed = ["first run" if last is None else ", ".join(
        f"{k.split('.', 1)[1]} {last.get(k)} → {v}" for k, v in fingerprint.items() if last.get(k) != v) or "forced"]
    logger.info("retraining: %s", changed[0])
    summary = rlhf_pipeline(config=config, project_dir=str(project), output_dir=output_dir)
    promotion = summary.get("promotion") or {}
    batches = [f"`{b['batch_id']}`" for b in summary["data"].get("labeling_batches") or []]
    rankings = f" (human rankings of labeling batches {', '.join(batches)})" if batches else ""
    artifacts.retrain_artifact(False, (
        f"**retrained** ({changed[0]}): data version `{version}`{rankings}, parent run "
        f"`{summary['mlflow_parent_run_id']}`; promotion: {'promoted' if promotion.get('promoted') else 'not promoted'}"
        "\n\n" + "\n".join(f"- {r}" for r in promotion.get("reasons", [])) + "\n"))
    return {**summary, "skipped": False}
