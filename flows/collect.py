"""The Prefect flow ``rlhf-collect``: InstructGPT's step 2 up to the labelers. It samples K responses per prompt from
a policy (:mod:`rlhf_pipeline.tasks.collect`), writes the labeling batch to ``collect.batches_dir`` of the project,
logs it to MLflow with the policy version it came from, and with a Label Studio URL puts its tasks into the ranking
project (:mod:`rlhf_pipeline.flows.label_studio`). ``rlhf import-rankings`` (:mod:`rlhf_pipeline.flows.feedback`)
brings the rankings back.

The policy (``collect.policy`` / ``--policy``):

- ``champion`` (default): ``<registry.policy_name>@champion`` of the profile (``rlhf-policy``; smoke:
  ``rlhf-policy-smoke``);
- a registered model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``NAME@ALIAS`` or ``NAME/VERSION``;
- a pipeline run's output folder (``runs/<profile>-<time>``): its SFT model (the paper samples from the SFT model);
- a transformers model folder.

The prompts: a file in any input format the pipeline accepts (``--prompts``), else the prepared prompts of
``collect.split`` (prepared first when missing); ``collect.num_prompts`` of them drawn with ``collect.seed``.

Collecting again with the same policy version, prompts, sampling settings and seed names the same batch: the batch
file is reused (nothing is sampled again), its MLflow run is found by the tag ``rlhf.batch_id``, and Label Studio
receives only the tasks it does not hold yet.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rlhf_pipeline.flows import artifacts, dvc, registry, tracking
from rlhf_pipeline.flows.config import Config, load_config
from rlhf_pipeline.flows.feedback import BATCH_ARTIFACT_DIR, batch_path, write_json_atomic
from rlhf_pipeline.tasks.collect import (
    batch_figures,
    batch_id_of,
    build_batch,
    choose_prompts,
    label_studio_tasks,
    read_prompts,
    sample_texts,
)

# ------------------------------------------------------------------------------------------------------------ policy


def policy_reference(config: Config, choice: str, project: Path) -> dict:
    """What ``choice`` names, without downloading anything (see the module docstring).

    Returns:
        ``{"kind": "registry" | "run" | "folder", "version" (recorded in the batch and its rows: ``NAME/VERSION``,
        ``run:<folder>/sft`` or ``folder:<path>``), "uri", ...}``; registry entries add ``name``,
        ``registry_version``, ``mlflow_run_id``, ``base_model``; run entries ``path``, ``run_dir``, ``mlflow_run_id``;
        folders ``path``.

    Raises:
        LookupError: a registered model, alias or version that does not exist (the message says how to make one).
        ValueError: ``choice`` is neither a model reference nor a folder holding a model or a run.
    """
    path = Path(choice).expanduser()
    path = path if path.is_absolute() else project / path
    registry_like = choice == "champion" or choice.startswith("models:/") or "@" in choice
    if not registry_like and path.exists():
        return _folder_reference(path)
    if choice == "champion":
        name, ref = config.registry.policy_name, registry.CHAMPION
    else:
        try:
            name, ref = registry.parse_model_ref(choice)
        except ValueError:
            raise ValueError(f"policy {choice!r} is neither a registered model (champion, NAME@ALIAS, NAME/VERSION, "
                             "models:/...) nor an existing folder") from None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = (client.get_model_version(name, ref) if ref.isdigit()
                   else client.get_model_version_by_alias(name, ref))
    except MlflowException:
        raise LookupError(f"no registered model {name}@{ref} in {client.tracking_uri}: run the pipeline first "
                          f"(`rlhf run --profile {config.profile}` registers {config.registry.policy_name}) or pass "
                          "--policy with a models:/ URI, a run's output folder or a model folder") from None
    return {"kind": "registry", "uri": f"models:/{name}/{version.version}", "name": name,
            "registry_version": int(version.version), "requested": f"{name}@{ref}" if not ref.isdigit() else None,
            "version": f"{name}/{version.version}", "mlflow_run_id": version.run_id,
            "base_model": version.tags.get("rlhf.base_model")}


def _folder_reference(path: Path) -> dict:
    summary = path / "summary.json"
    if summary.is_file():  # a pipeline run's output folder: its SFT model
        stage = json.loads(summary.read_text()).get("stages", {}).get("sft", {})
        model = stage.get("paths", {}).get("model")
        if not model or not Path(model).is_dir():
            raise ValueError(f"{path} is a run folder without an SFT model (summary.json: sft {stage.get('status')})")
        return {"kind": "run", "uri": str(Path(model).resolve()), "path": str(Path(model).resolve()),
                "run_dir": str(path.resolve()), "mlflow_run_id": stage.get("mlflow_run_id"),
                "version": f"run:{path.resolve().name}/sft"}
    if (path / "sft" / "model" / "config.json").is_file():
        model = (path / "sft" / "model").resolve()
        return {"kind": "run", "uri": str(model), "path": str(model), "run_dir": str(path.resolve()),
                "mlflow_run_id": None, "version": f"run:{path.resolve().name}/sft"}
    if (path / "config.json").is_file():
        return {"kind": "folder", "uri": str(path.resolve()), "path": str(path.resolve()),
                "version": f"folder:{path.resolve()}"}
    raise ValueError(f"{path} holds neither a model (config.json) nor a pipeline run (summary.json, sft/model)")


def policy_model_dir(policy: dict, dst: Path) -> Path:
    """The transformers folder of ``policy`` (:func:`policy_reference`), downloading a registered one into ``dst``.

    Raises:
        LookupError: the registered version has no model folder.
    """
    if policy["kind"] != "registry":
        return Path(policy["path"])
    folder = registry.download_model_dir(policy["name"], str(policy["registry_version"]), dst)
    if folder is None:
        raise LookupError(f"{policy['uri']} has no model folder to sample from")
    return folder


# ----------------------------------------------------------------------------------------------------------- prompts


def ensure_prepared(config: Config, project: Path) -> Path:
    """The prepared data folder, brought up to date: ``dvc repro prepare`` in a DVC project whose ``params.yaml`` has
    this data section (a no-op when nothing changed), else ``rlhf prepare``'s work when the folder is missing.

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: the data failed the gate.
    """
    prepared = Path(config.data.prepared_dir)
    if dvc.uses_dvc(project, config):
        dvc.dvc_repro_prepare(project, config)
    elif not (prepared / "prompts.parquet").is_file():
        dvc.prepare_data(config)
    return prepared


def load_prompts(config: Config, project: Path, prompts_file: str | None) -> tuple[list[dict], dict]:
    """The prompts of a batch: ``collect.num_prompts`` drawn with ``collect.seed`` from ``prompts_file`` (any input
    format) or from the prepared prompts of ``collect.split``.

    Returns:
        ``(prompts, origin)``: ``[{"prompt_id", "prompt"}]`` and where they came from (recorded in the batch).

    Raises:
        rlhf_pipeline.tasks.readers.DataError: the file is missing, unreadable, or has rows without a prompt.
        ValueError: the split has no prompts.
    """
    from rlhf_pipeline.tasks.datasets import data_version, load_prepared
    from rlhf_pipeline.tasks.readers import read_rows

    cfg = config.collect
    if prompts_file:
        path = Path(prompts_file).expanduser()
        path = path if path.is_absolute() else project / path
        available = read_prompts(read_rows(path), str(path))
        origin = {"file": str(path.resolve()), "available": len(available)}
    else:
        prepared = ensure_prepared(config, project)
        frame = load_prepared(prepared, "prompts", split=cfg.split)
        if frame.empty:
            raise ValueError(f"no prompts in the {cfg.split!r} split of {prepared} (collect.split)")
        available = [{"prompt_id": pid, "prompt": list(prompt)} for pid, prompt in zip(frame["id"], frame["prompt"])]
        origin = {"prepared": str(prepared), "split": cfg.split, "data_version": data_version(prepared),
                  "available": len(available)}
    chosen = choose_prompts(available, cfg.num_prompts, cfg.seed)
    return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"]} for p in chosen], {**origin, "chosen": len(chosen)}


# ------------------------------------------------------------------------------------------------------------- batch


def collect_batch(config: Config, project: Path, prompts: list[dict], origin: dict, policy: dict) -> tuple[Path, bool]:
    """Sample the labeling batch (or reuse the file of the same batch id) and write it.

    Returns:
        ``(batch file, reused)``.
    """
    import torch

    from rlhf_pipeline.models.loading import load_causal_lm, load_tokenizer, resolve_device
    from rlhf_pipeline.tasks.stage import seed_everything

    cfg = config.collect
    batch_id = batch_id_of(policy["version"], [p["prompt_id"] for p in prompts], cfg, cfg.seed)
    path = batch_path(config, project, batch_id)
    if path.is_file():
        return path, True
    with tempfile.TemporaryDirectory(prefix="rlhf-collect-policy-") as tmp:
        model_dir = policy_model_dir(policy, Path(tmp))
        device = resolve_device(config.model.device)
        tokenizer = load_tokenizer(model_dir)
        model = load_causal_lm(model_dir, device).eval()
        seed_everything(cfg.seed)
        texts = [p["prompt"] for p in prompts]
        with torch.no_grad():
            batch = build_batch(prompts, lambda counts: sample_texts(model, tokenizer, texts, counts, cfg), cfg,
                                policy, origin)
    write_json_atomic(path, batch)
    return path, False


def log_batch(config: Config, project: Path, path: Path, batch: dict) -> str:
    """The MLflow run of a batch (experiment ``registry.experiment``, run ``collect-<batch_id>``, tags ``rlhf.kind``
    = collect, ``rlhf.batch_id``, ``rlhf.policy_version``, ``rlhf.policy``; params ``collect.*``; the batch counts as
    metrics; the batch file as the artifact ``labeling_batch/<batch_id>.json``). An existing run of the same batch is
    returned instead of logging it twice."""
    from mlflow import MlflowClient

    experiment_id = tracking.setup_mlflow(project, config.registry.experiment)
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`rlhf.batch_id` = '{batch['batch_id']}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"rlhf.kind": "collect", "rlhf.batch_id": batch["batch_id"], "rlhf.policy_version": batch["policy"]["version"],
            "rlhf.policy": batch["policy"]["uri"], "rlhf.profile": config.profile}
    run = client.create_run(experiment_id, run_name=f"collect-{batch['batch_id']}", tags=tags)
    run_id = run.info.run_id
    params = {f"collect.{k}": str(v) for k, v in config.collect.model_dump().items()}
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    tracking.log_metrics_batch(run_id, batch_figures(batch))
    client.log_artifact(run_id, str(path), artifact_path=BATCH_ARTIFACT_DIR)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def collect_markdown(batch: dict, path: Path, run_id: str, pushed: dict | None) -> str:
    """The Prefect artifact ``rlhf-collect``: the batch, its policy, the counts, where it went."""
    figures = batch_figures(batch)
    lines = [f"**labeling batch `{batch['batch_id']}`**: {int(figures['tasks'])} tasks of K = {int(figures['k'])} "
             f"responses from `{batch['policy']['version']}` ({batch['policy']['uri']})", "",
             f"- file: `{path}`", f"- MLflow run `{run_id}` (artifact `{BATCH_ARTIFACT_DIR}/{path.name}`)",
             f"- samples drawn {int(figures['drawn'])}; exact duplicates dropped {int(figures['duplicates_dropped'])}, "
             f"empty dropped {int(figures['empty_dropped'])}; prompts left out {int(figures['skipped_prompts'])}"]
    if pushed:
        lines.append(f"- Label Studio: {pushed['imported']} tasks imported, {pushed['already_there']} already there: "
                     f"{pushed['url']}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------------- flow


@task(name="collect-prompts", cache_policy=NO_CACHE)
def prompts_task(config: Config, project_dir: str, prompts_file: str | None) -> tuple[list[dict], dict]:
    """The batch's prompts (:func:`load_prompts`)."""
    return load_prompts(config, Path(project_dir), prompts_file)


@task(name="sample-batch", cache_policy=NO_CACHE)
def sample_task(config: Config, project_dir: str, prompts: list[dict], origin: dict, policy: dict) -> tuple[str, bool]:
    """Sample and write the labeling batch (:func:`collect_batch`)."""
    path, reused = collect_batch(config, Path(project_dir), prompts, origin, policy)
    return str(path), reused


@task(name="push-to-label-studio", cache_policy=NO_CACHE)
def push_task(url: str, title: str, batch_path_: str, annotators_per_task: int) -> dict:
    """Create or reuse the ranking project and import the batch's new tasks (token from ``LABEL_STUDIO_API_KEY``)."""
    from rlhf_pipeline.flows.label_studio import LabelStudio, push_tasks

    batch = json.loads(Path(batch_path_).read_text())
    return push_tasks(LabelStudio(url), title, label_studio_tasks(batch), annotators_per_task)


@flow(name="rlhf-collect")
def rlhf_collect(
    profile: str = "demo",
    config_path: str = "params.yaml",
    project_dir: str = ".",
    overrides: list[str] | None = None,
    prompts_file: str | None = None,
    policy: str | None = None,
    label_studio_url: str | None = None,
    label_studio_project: str | None = None,
) -> dict:
    """Sample a labeling batch and hand it to the labelers (see the module docstring).

    Args:
        profile, config_path, overrides: the configuration; a relative ``config_path`` is relative to ``project_dir``.
        project_dir: the project (``params.yaml``, ``mlflow.db``, the batch files).
        prompts_file: prompts in any accepted input format (default: the prepared prompts of ``collect.split``).
        policy: overrides ``collect.policy``.
        label_studio_url: when given, the tasks go into the ranking project there (the API token is read from
            ``LABEL_STUDIO_API_KEY`` on the machine that runs the flow; it is never a parameter).
        label_studio_project: overrides ``collect.label_studio_project``.

    Returns:
        ``{"batch_id", "batch_path", "reused", "tasks", "skipped", "policy", "mlflow_run_id", "label_studio"}``.

    Raises:
        LookupError: the policy is not registered; ValueError / DataError: bad prompts or policy folder;
        rlhf_pipeline.flows.label_studio.LabelStudioError: Label Studio refused or is unreachable (the batch is
        written and logged before, so a retry pushes the same batch).
    """
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    path = Path(config_path)
    config = load_config(path if path.is_absolute() else project / path, profile, overrides)
    tracking.setup_mlflow(project, config.registry.experiment)
    reference = policy_reference(config, policy or config.collect.policy, project)
    logger.info("policy %s (%s)", reference["version"], reference["uri"])
    prompts, origin = prompts_task(config, str(project), prompts_file)
    batch_file, reused = sample_task(config, str(project), prompts, origin, reference)
    batch = json.loads(Path(batch_file).read_text())
    logger.info("labeling batch %s: %d tasks (%s) in %s", batch["batch_id"], len(batch["tasks"]),
                "reused" if reused else "sampled", batch_file)
    run_id = log_batch(config, project, Path(batch_file), batch)
    pushed = None
    if label_studio_url:
        pushed = push_task(label_studio_url, label_studio_project or config.collect.label_studio_project, batch_file,
                           config.collect.annotators_per_task)
        logger.info("Label Studio: %d tasks imported, %d already there: %s", pushed["imported"],
                    pushed["already_there"], pushed["url"])
    artifacts.publish("rlhf-collect", f"labeling batch {batch['batch_id']}",
                      collect_markdown(batch, Path(batch_file), run_id, pushed))
    return {"batch_id": batch["batch_id"], "batch_path": batch_file, "reused": reused, "tasks": len(batch["tasks"]),
            "skipped": batch["skipped"], "policy": batch["policy"], "mlflow_run_id": run_id, "label_studio": pushed}
