"""Lineage of a registered model: from a registry version back to the data, code, parameters and runs that made it.

Every registered version carries tags set by the pipeline: ``rlhf.data_version`` (content hash of the prepared
datasets), ``rlhf.git_commit``, ``rlhf.code_version`` (hash of ``flows/``, ``tasks/``, ``models/``),
``rlhf.params_hash``, ``rlhf.mlflow_parent_run_id``, ``rlhf.prefect_flow_run_id``, the stages' cache keys, the
labeling batches whose human rankings the data holds (``rlhf.labeling_batches``) and the promotion decision. The
parent run holds the resolved configuration as ``config.json``; the SFT stage run records the reward model that picked
its checkpoint. :func:`reproduce` re-runs the pipeline from exactly that configuration with no
cache and no registration and compares the policy's weights with the registered ones.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_pipeline.flows import registry

LINEAGE_TAGS = ("rlhf.profile", "rlhf.base_model", "rlhf.data_version", "rlhf.git_commit", "rlhf.code_version",
                "rlhf.params_hash", "rlhf.mlflow_parent_run_id", "rlhf.prefect_flow_run_id", "rlhf.reward_model_version",
                "rlhf.sft_cache_key", "rlhf.reward_cache_key", "rlhf.ppo_cache_key", "rlhf.labeling_batches")


def model_lineage(ref: str) -> dict:
    """Collect the chain of ``ref`` (``NAME@ALIAS`` or ``NAME/VERSION``) from the MLflow tracking store.

    Returns:
        ``{"name", "version", "aliases", "source_run_id", "tags" (lineage tags), "promotion" (rlhf.promotion.* tags),
        "parent": {run_id, status, start_time, params_count}, "stages": [{stage, run_id, status, reused_from,
        metrics}], "selection_reward_model"}``.

    Raises:
        ValueError: for a malformed reference.
        LookupError: when the model, alias or version does not exist, or the version has no lineage tags.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, which = registry.parse_model_ref(ref)
    client = MlflowClient()
    try:
        version = (client.get_model_version(name, which) if which.isdigit()
                   else client.get_model_version_by_alias(name, which))
    except MlflowException as exc:
        from rlhf_pipeline.flows.tracking import redact_uri

        raise LookupError(f"no registered model version {ref} in {redact_uri(client.tracking_uri)}") from exc
    tags = version.tags
    parent_id = tags.get("rlhf.mlflow_parent_run_id")
    if not parent_id:
        raise LookupError(f"{name} version {version.version} has no lineage tags (registered outside the pipeline?)")
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
    stages = []
    selection = None
    for run in children:
        reused = run.data.tags.get("rlhf.reused_run_id")
        stage = run.data.tags.get("rlhf.stage", run.data.tags.get("mlflow.runName"))
        source = client.get_run(reused) if reused else run
        if stage == "sft":
            selection = source.data.tags.get("rlhf.selection_reward_model")
        stages.append({"stage": stage, "run_id": run.info.run_id, "status": run.info.status, "reused_from": reused,
                       "metrics": dict(source.data.metrics), "cache_key": run.data.tags.get("rlhf.cache_key")})
    return {
        "name": name,
        "version": int(version.version),
        "aliases": sorted(getattr(version, "aliases", []) or []),
        "source_run_id": version.run_id,
        "tags": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
        "promotion": {k.removeprefix("rlhf.promotion."): v for k, v in tags.items() if k.startswith("rlhf.promotion.")},
        "parent": {"run_id": parent_id, "status": parent.info.status, "experiment_id": parent.info.experiment_id,
                   "start_time": parent.info.start_time, "run_name": parent.data.tags.get("mlflow.runName")},
        "stages": stages,
        "selection_reward_model": selection,
    }


def format_lineage(chain: dict) -> list[str]:
    """Human-readable lines of a :func:`model_lineage` chain (model → parent run → stages → data/code/params)."""
    import time

    t = chain["tags"]
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(chain["parent"]["start_time"] / 1000))
    lines = [
        f"{chain['name']} version {chain['version']}  aliases: {', '.join(chain['aliases']) or '-'}",
        f"├─ promotion: {chain['promotion'].get('decision', 'none')}"
        + (f" ({chain['promotion']['reasons']})" if chain["promotion"].get("reasons") else ""),
        f"├─ logged by MLflow run {chain['source_run_id']}",
        f"├─ pipeline run {chain['parent']['run_id']} ({chain['parent']['run_name']}, {chain['parent']['status']}, "
        f"started {started} UTC, experiment {chain['parent']['experiment_id']})",
        f"│  └─ Prefect flow run {t.get('rlhf.prefect_flow_run_id') or '-'}",
    ]
    for i, stage in enumerate(chain["stages"]):
        branch = "└─" if i == len(chain["stages"]) - 1 else "├─"
        reused = f", reused run {stage['reused_from']}" if stage["reused_from"] else ""
        lines.append(f"│     {branch} {stage['stage']}: run {stage['run_id']} {stage['status']}{reused}")
    lines += [
        f"├─ data version {t.get('rlhf.data_version', '-')} (content hash of data/prepared; `dvc.lock` of that commit)",
        *([f"│  └─ human rankings from labeling batches {t['rlhf.labeling_batches']} (`rlhf collect` runs tagged "
            "rlhf.batch_id)"] if t.get("rlhf.labeling_batches") else []),
        f"├─ git commit {t.get('rlhf.git_commit', '-')}, code version {t.get('rlhf.code_version', '-')}",
        f"├─ profile {t.get('rlhf.profile', '-')}, base model {t.get('rlhf.base_model', '-')}, params hash "
        f"{t.get('rlhf.params_hash', '-')} (the resolved config: artifact config.json of the pipeline run)",
    ]
    if chain.get("selection_reward_model"):
        lines.append(f"├─ SFT checkpoint picked by {chain['selection_reward_model']}")
    if t.get("rlhf.reward_model_version"):
        lines.append(f"├─ reward model version {t['rlhf.reward_model_version']} of the same run")
    commit = t.get("rlhf.git_commit", "HEAD").removesuffix("+dirty")
    lines.append(f"└─ reproduce: git checkout {commit} && rlhf lineage {chain['name']}/{chain['version']} --reproduce")
    return lines


def reproduce(chain: dict, project: Path, output_dir: Path) -> dict:
    """Re-run the pipeline that made ``chain``'s model from its recorded configuration (no cache, no registration),
    with the same checkpoint-selection reward model, and compare the policy weights with the registered version's.

    Returns:
        ``{"summary", "max_abs_diff", "tensors", "reproduced" (max |Δw| <= 1e-5), "warnings"}``; warnings name a
        different git commit, code version or data version than the recorded ones (the result may then differ).

    Raises:
        LookupError: when the pipeline run has no ``config.json`` or the registered weights cannot be downloaded.
    """
    import json
    import tempfile

    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from rlhf_pipeline.flows.caching import code_version
    from rlhf_pipeline.flows.config import Config
    from rlhf_pipeline.flows.dvc import git_commit
    from rlhf_pipeline.flows.pipeline import rlhf_pipeline

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_file = client.download_artifacts(chain["parent"]["run_id"], "config.json", tmp)
        except Exception as exc:
            raise LookupError(f"pipeline run {chain['parent']['run_id']} has no config.json artifact") from exc
        raw = json.loads(Path(config_file).read_text())
    if chain.get("selection_reward_model"):
        raw["sft"]["selection_reward_model"] = chain["selection_reward_model"]
    elif raw.get("sft", {}).get("selection_reward_model") == "champion":
        raw["sft"]["selection_reward_model"] = None  # the original run had no champion RM: selection by eval loss
    config = Config.model_validate(raw)
    tags = chain["tags"]
    warnings = []
    if tags.get("rlhf.git_commit") and tags["rlhf.git_commit"] != git_commit(project):
        warnings.append(f"recorded git commit {tags['rlhf.git_commit']}, this checkout {git_commit(project)}")
    if tags.get("rlhf.code_version") and tags["rlhf.code_version"] != code_version():
        warnings.append(f"recorded code version {tags['rlhf.code_version']}, this code {code_version()}")
    summary = rlhf_pipeline(config=config, project_dir=str(project), output_dir=str(output_dir), use_cache=False,
                            register_models=False)
    if summary["data"].get("version") != tags.get("rlhf.data_version"):
        warnings.append(f"recorded data version {tags.get('rlhf.data_version')}, reproduced on "
                        f"{summary['data'].get('version')}")
    registered = registry.download_model_dir(chain["name"], str(chain["version"]), output_dir / "registered")
    if registered is None:
        raise LookupError(f"cannot download {chain['name']} version {chain['version']}")
    reproduced_dir = Path(summary["stages"]["ppo"]["paths"]["model"])
    original = {}
    for f in sorted(registered.glob("*.safetensors")):
        original.update(load_file(f))
    new = {}
    for f in sorted(reproduced_dir.glob("*.safetensors")):
        new.update(load_file(f))
    if set(original) != set(new):
        return {"summary": summary, "max_abs_diff": float("inf"), "tensors": len(original), "reproduced": False,
                "warnings": warnings + ["the reproduced model has different tensors"]}
    diff = max(float((original[k].float() - new[k].float()).abs().max()) for k in original) if original else 0.0
    return {"summary": summary, "max_abs_diff": diff, "tensors": len(original), "reproduced": diff <= 1e-5,
            "warnings": warnings}
