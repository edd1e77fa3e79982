"""The ``rlhf`` command line: ``run`` the pipeline, ``prepare`` the data (the DVC stage), ``validate`` a data file,
``retrain``, ``promote``, ``lineage``, and the human-feedback loop: ``collect`` (responses for labelers) and
``import-rankings`` (their rankings back into the data).

Heavy libraries (torch, Prefect, MLflow, GX) are imported inside the commands, so ``rlhf --help`` stays fast.
"""

from __future__ import annotations

import enum
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer


class Kind(str, enum.Enum):
    auto = "auto"
    comparisons = "comparisons"
    demonstrations = "demonstrations"


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The InstructGPT recipe as Prefect flows tracked in MLflow.")


def _quiet_defaults() -> None:
    """Environment defaults for a local run: Prefect's temporary server gets time to start, no telemetry."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # no hard wraps: logs and CI keep whole lines


def _say(console, text: str = "", style: str | None = None, lead: str = "", lead_style: str = "bold") -> None:
    """Print ``text`` literally (user data, paths and messages are never read as terminal markup: ``[bold]`` in a file
    name stays in it) with credentials in URIs redacted; ``lead`` is a styled prefix."""
    from rich.text import Text

    from rlhf_pipeline.flows.tracking import redact_text

    line = Text()
    if lead:
        line.append(lead, style=lead_style)
    line.append(redact_text(str(text)), style=style)
    console.print(line, highlight=False)


def _fail(console, headline: str, detail: str = "", code: int = 1):
    """Print a red headline and a literal detail, and exit with ``code``."""
    _say(console, (" " + detail if detail and "\n" not in detail else ("\n" + detail if detail else "")),
         lead=headline, lead_style="bold red")
    raise typer.Exit(code)


def _preflight(console, cfg, project: Path, tracking: bool = True) -> None:
    """Before any work: ``model.base`` must exist (exit 2) and the MLflow store must answer (exit 1), each said in one
    line within seconds (no traceback, no HTTP retries)."""
    from rlhf_pipeline.models.loading import ModelLoadError, check_base_model

    try:
        check_base_model(cfg.model.base, cfg.model.cache_dir)
    except ModelLoadError as exc:
        _fail(console, "configuration error:", str(exc), code=2)
    if tracking:
        from rlhf_pipeline.flows.tracking import TrackingUnavailable, check_tracking_store, tracking_uri

        try:
            check_tracking_store(tracking_uri(project))
        except TrackingUnavailable as exc:
            _fail(console, "MLflow unavailable:", str(exc), code=1)


def _load_config_or_exit(console, path: Path, profile: str | None = None, overrides: list[str] | None = None):
    """``load_config`` with its errors (missing file, unknown profile, bad override, wrong value) as one clear line
    and exit code 2 instead of a traceback."""
    from pydantic import ValidationError

    from rlhf_pipeline.flows.config import load_config

    try:
        return load_config(path, profile, overrides)
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            problems = "; ".join((f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "")
                                 + e["msg"].removeprefix("Value error, ") for e in exc.errors())
            _fail(console, f"invalid configuration in {path}:", problems, code=2)
        _fail(console, "configuration error:", str(exc), code=2)


@app.command()
def run(
    profile: str = typer.Option("demo", help="smoke (tiny model, minutes) | demo (SmolLM2-135M, <20 min on 2 CPU cores) "
                                             "| full (GPU worker)"),
    config: Path = typer.Option(Path("params.yaml"), help="parameter file (DVC's params.yaml)"),
    output_dir: Optional[Path] = typer.Option(None, help="where models and summary.json go (default runs/<profile>-<time>)"),
    set_: list[str] = typer.Option([], "--set", help="override a value: section.key=value (repeatable)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="re-run every stage even when its inputs are unchanged"),
) -> None:
    """Run the whole pipeline: validate → SFT → reward model → PPO → evaluate → register → promote.

    Stages whose inputs (data version, config section, upstream stages, code) are unchanged are reused."""
    _quiet_defaults()
    console = _console()
    cfg = _load_config_or_exit(console, config, profile, set_)
    project_dir = config.resolve().parent
    _preflight(console, cfg, project_dir)
    out = output_dir or Path("runs") / f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not out.is_absolute():
        out = project_dir / out
    from rlhf_pipeline.flows.pipeline import rlhf_pipeline

    _say(console, f" profile={profile} model={cfg.model.base} output={out}", lead="rlhf-pipeline")
    start = time.time()
    summary = _run_flow_or_exit(console, "pipeline", out / "summary.json", rlhf_pipeline, config=cfg,
                                project_dir=str(project_dir), output_dir=str(out), use_cache=not no_cache)
    _print_summary(console, summary, out, time.time() - start)


def _run_flow_or_exit(console, what: str, summary: Path | None, flow_fn, **kwargs) -> dict:
    """Run a flow (with the watchdog that ends its temporary Prefect server should this process be killed); bad data
    (a failed gate, an unreadable source) and a missing model exit 2 ("nothing registered"), an unusable MLflow store
    and any other error exit 1 naming it; the run's ``summary.json`` is named only when it was written."""
    from rlhf_pipeline.flows import watchdog
    from rlhf_pipeline.flows.tracking import TrackingUnavailable
    from rlhf_pipeline.models.loading import ModelLoadError
    from rlhf_pipeline.tasks.readers import DataError
    from rlhf_pipeline.tasks.validate import ValidationFailed

    watchdog.start()
    try:
        return flow_fn(**kwargs)
    except ValidationFailed as exc:
        _fail(console, "data validation failed; no training ran, nothing registered", str(exc), code=2)
    except DataError as exc:
        _fail(console, "data could not be read; no training ran, nothing registered", str(exc), code=2)
    except ModelLoadError as exc:
        _fail(console, "configuration error:", str(exc), code=2)
    except TrackingUnavailable as exc:
        _fail(console, "MLflow unavailable:", str(exc), code=1)
    except Exception as exc:
        hint = ""
        if summary is not None and summary.is_file():
            import json

            try:
                hint = json.loads(summary.read_text()).get("hint", "")
            except ValueError:
                pass
            hint = f"\n{hint}\nsee {summary}" if hint else f"\nsee {summary}"
        _fail(console, f"{what} failed:", f"{type(exc).__name__}: {exc}{hint}", code=1)


def _print_summary(console, summary: dict, out: Path, wall: float) -> None:
    from rich.table import Table
    from rich.text import Text

    from rlhf_pipeline.flows.stages import STAGE

    table = Table(title=Text(f"rlhf-pipeline finished in {wall / 60:.1f} min (data version "
                             f"{summary['data'].get('version')})"))
    table.add_column("stage")
    table.add_column("status")
    table.add_column("key figures")
    for stage, entry in summary["stages"].items():
        metrics = entry.get("metrics", {})
        figures = []
        keys = STAGE[stage].figures if stage in STAGE else ()
        for key in keys:
            value = metrics.get(key)
            if key.endswith("_ci") and key[:-3] in keys and isinstance(metrics.get(key[:-3]), (int, float)):
                continue  # shown beside its figure
            ci = metrics.get(f"{key}_ci") if f"{key}_ci" in keys else None
            if isinstance(value, list):
                figures.append(f"{key}=[{value[0]:.3f}, {value[1]:.3f}]")
            elif isinstance(value, (int, float)):
                figures.append(f"{key}={value:.4g}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) else ""))
        if "wall_s" in metrics:
            figures.append(f"{metrics['wall_s']:.0f}s")
        status = entry["status"] + (f" (run {entry['mlflow_run_id'][:8]})" if entry["status"] == "reused" else "")
        table.add_row(Text(stage), Text(status), Text("  ".join(figures)))
    console.print(table)
    for batch in summary["data"].get("labeling_batches") or []:
        console.print(f"labeling batch {batch['batch_id']} in the data: {batch['rows']} ranked comparisons "
                      f"(policy {batch['policy_version']})", highlight=False)
    evaluation = summary["stages"].get("evaluate", {}).get("metrics", {})
    if evaluation.get("headline"):
        _say(console, evaluation["headline"], lead="result: ")
    verdict = evaluation.get("judge_verdict")
    if verdict:
        _say(console, f"judge: {verdict}")
    for model in summary.get("registered_models", []):
        what = "already registered (the same weights)" if model.get("reused") else "registered"
        _say(console, f"{what} {model['name']} version {model['version']} aliases {model['aliases']}")
    promotion = summary.get("promotion") or {}
    if promotion:
        if promotion.get("promoted"):
            _say(console, "promoted to champion", style="green", lead="promotion: ", lead_style="")
        else:
            _say(console, "promotion: not promoted" + (" (skipped)" if promotion.get("skipped") else ""))
        for reason in promotion.get("reasons", []):
            _say(console, f"  {reason}")
    uri = summary.get("tracking_uri", "")
    mlflow_ui = (f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri}" if uri.startswith("sqlite")
                 else f"open {uri} (credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
    _say(console,
         f"\nsummary: {out / 'summary.json'}\n"
         f"MLflow:  {mlflow_ui}   (parent run {summary['mlflow_parent_run_id']})\n"
         f"Prefect: flow run {summary['prefect_flow_run_id']} (temporary server unless PREFECT_API_URL is set; "
         "`prefect server start` keeps a dashboard)")


@app.command()
def prepare(
    config: Path = typer.Option(Path("params.yaml"), help="parameter file"),
    strict: bool = typer.Option(False, help="fail on any malformed row instead of dropping it with a report"),
) -> None:
    """Ingest the configured sources, run the GX gate and write the prepared datasets (the DVC `prepare` stage)."""
    _quiet_defaults()
    from rlhf_pipeline.flows.dvc import failure_file, kept_note, prepare_data, write_failure
    from rlhf_pipeline.flows.locks import data_lock
    from rlhf_pipeline.tasks.readers import DataError
    from rlhf_pipeline.tasks.validate import ValidationFailed

    console = _console()
    cfg = _load_config_or_exit(console, config)
    _preflight(console, cfg, config.resolve().parent, tracking=False)
    with data_lock(cfg.data.prepared_dir, on_wait=lambda message: _say(console, message)):
        failure = failure_file(cfg)
        failure.unlink(missing_ok=True)
        try:
            result = prepare_data(cfg, strict=strict)
        except (ValidationFailed, DataError) as exc:
            write_failure(cfg, exc)
            what = "data validation failed" if isinstance(exc, ValidationFailed) else "data could not be read"
            _fail(console, what, f"{exc}\n{kept_note(cfg)}", code=1)
    _say(console, f"prepared data version {result['version']}: {result['counts']}; {len(result['dropped'])} "
                  f"malformed rows dropped, {len(result['structure_warnings'])} kept with an unusual structure "
                  f"(report: {result['report_path']})")


@app.command()
def validate(
    data: Optional[Path] = typer.Option(None, help="one data file to check (default: the sources in the config)"),
    kind: Kind = typer.Option(Kind.auto, help="what the file holds; auto: from its first row"),
    config: Path = typer.Option(Path("params.yaml"), help="parameter file (budgets, split, policy)"),
    strict: bool = typer.Option(False, help="fail on any malformed row (default: the config's policy)"),
) -> None:
    """Run the Great Expectations gate alone; exits non-zero when it fails, naming the rows and rules."""
    _quiet_defaults()
    from rlhf_pipeline.flows.dvc import token_counter
    from rlhf_pipeline.tasks.formats import COMPARISON_FORMATS
    from rlhf_pipeline.tasks.ingest import detect_file_format
    from rlhf_pipeline.tasks.readers import DataError, read_rows
    from rlhf_pipeline.tasks.validate import SourceConfig, ValidationFailed, run_validate

    console = _console()
    cfg = _load_config_or_exit(console, config)
    _preflight(console, cfg, config.resolve().parent, tracking=False)
    data_cfg = cfg.data
    if data is not None:
        if not data.exists():
            _fail(console, "data file not found:", str(data), code=2)
        if data.is_dir():
            _fail(console, f"{data} is a folder; give one data file", code=2)
        kind = kind.value
        if kind == "auto":  # as ingestion decides: the first row that decodes and matches a format
            try:
                fmt, _ = detect_file_format(read_rows(data), str(data))
            except DataError as exc:
                message = str(exc)
                _fail(console, f"{data} holds no rows" if "rule no_rows" in message else "cannot read the file:",
                      "" if "rule no_rows" in message else message, code=1)
            kind = "comparisons" if fmt in COMPARISON_FORMATS else "demonstrations"
        # the file's own name in reports (characters a source name may not hold become '_')
        name = re.sub(r"[^A-Za-z0-9._-]", "_", data.name).lstrip("._-")[:100] or "data"
        source = SourceConfig(name=name, path=str(data.resolve()))
        other = "demonstrations" if kind == "comparisons" else "comparisons"
        prompts_min = data_cfg.min_rows.get("prompts", 0) if kind == "comparisons" else 0
        data_cfg = data_cfg.model_copy(update={kind: [source], other: [],
                                               "min_rows": {**data_cfg.min_rows, other: 0, "prompts": prompts_min}})
    if data is not None:
        _say(console, f"validating {data} as {kind}")
    try:
        result = run_validate(data_cfg, count_tokens=token_counter(cfg), strict=strict)
    except ValidationFailed as exc:
        _fail(console, "validation failed", str(exc), code=1)
    except DataError as exc:
        _fail(console, "cannot read the data:", str(exc), code=1)
    _say(console, f": {result['counts']}", lead="validation passed", lead_style="green")
    for row in result["dropped"]:
        _say(console, f"  dropped {row['dataset']} {row['source']} row {row['row']} id {row['id']}: {row['rule']}"
                      + (f" ({row['detail']})" if row.get("detail") else ""))
    for row in result["structure_warnings"]:
        _say(console, f"  kept {row['dataset']} {row['source']} row {row['row']} id {row['id']}: {row['rule']} "
                      f"({row['detail']}); --strict refuses it")


@app.command()
def retrain(
    profile: str = typer.Option("demo", help="smoke | demo | full"),
    config: Path = typer.Option(Path("params.yaml"), help="parameter file (DVC's params.yaml)"),
    output_dir: Optional[Path] = typer.Option(None, help="where a retrain writes (default runs/<profile>-<time>)"),
    force: bool = typer.Option(False, help="retrain even when data, parameters and code are unchanged"),
) -> None:
    """What the scheduled `rlhf-retrain` deployment runs: refresh the data (DVC), skip when nothing changed since the
    last successful run, else run the pipeline and gate the promotion."""
    _quiet_defaults()
    console = _console()
    cfg = _load_config_or_exit(console, config, profile)
    _preflight(console, cfg, config.resolve().parent)
    from rlhf_pipeline.flows.retrain import rlhf_retrain

    start = time.time()
    result = _run_flow_or_exit(console, "retrain", None, rlhf_retrain, profile=profile,
                               config_path=str(config.resolve()), project_dir=str(config.resolve().parent),
                               output_dir=str(output_dir) if output_dir else None, force=force)
    if result.get("skipped"):
        _say(console, f": {result['reason']}", lead="retrain skipped")
        return
    _print_summary(console, result, Path(result["output_dir"]), time.time() - start)


@app.command()
def promote(
    version: Optional[int] = typer.Option(None, help="make this policy version (and its run's reward model) champion"),
    rollback: bool = typer.Option(False, "--rollback", help="move champion back to the version it replaced"),
    profile: str = typer.Option("demo", help="whose registered names (params.yaml registry section)"),
    config: Path = typer.Option(Path("params.yaml"), help="parameter file"),
) -> None:
    """Move the registry's `champion` alias by hand: `--version N` promotes, `--rollback` undoes the last promotion.

    Holds the same lock as the pipeline's gated promotion, so two promotions never interleave."""
    _quiet_defaults()
    console = _console()
    cfg = _load_config_or_exit(console, config, profile)
    if rollback == (version is not None):
        _fail(console, "give exactly one of --version N and --rollback", code=2)
    from rlhf_pipeline.flows import registry, tracking
    from rlhf_pipeline.flows.locks import promotion_lock

    project = config.resolve().parent
    _preflight(console, cfg, project)
    tracking.setup_mlflow(project, cfg.registry.experiment)
    names = (cfg.registry.policy_name, cfg.registry.reward_model_name)
    try:
        with promotion_lock(project):
            repaired = registry.repair_champions(*names)
            if repaired:
                _say(console, f"repaired first: {repaired}", style="yellow")
            moves = registry.rollback(*names) if rollback else registry.promote_version(*names, version)
    except LookupError as exc:
        _fail(console, str(exc), code=1)
    if moves.get("unchanged"):
        _say(console, f"{names[0]} version {version} is the champion already")
        return
    for kind, move in moves.items():
        name = names[0] if kind == "policy" else names[1]
        _say(console, f"{name}: champion {move[0]} → {move[1]}")


@app.command()
def lineage(
    model: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION, e.g. rlhf-policy@champion"),
    reproduce: bool = typer.Option(False, help="re-run the pipeline from the recorded configuration (no cache, no "
                                                 "registration) and compare the weights with the registered ones"),
    config: Path = typer.Option(Path("params.yaml"), help="parameter file (locates the project and its MLflow store)"),
    output_dir: Optional[Path] = typer.Option(None, help="where a reproduction writes (default runs/reproduce-<time>)"),
) -> None:
    """Print where a registered model came from: data version, git commit, parameters, code, MLflow runs, Prefect
    flow run; with --reproduce, re-run it and check the weights match."""
    _quiet_defaults()
    console = _console()
    from rlhf_pipeline.flows import lineage as lineage_mod
    from rlhf_pipeline.flows import tracking
    from rlhf_pipeline.flows.registry import parse_model_ref

    try:
        parse_model_ref(model)
    except ValueError as exc:
        _fail(console, str(exc), code=2)
    cfg = _load_config_or_exit(console, config)  # the project (and its MLflow store) is the folder of --config
    project = config.resolve().parent
    _preflight(console, cfg, project)
    tracking.setup_mlflow(project, cfg.registry.experiment)
    try:
        chain = lineage_mod.model_lineage(model)
    except LookupError as exc:
        _fail(console, str(exc), code=1)
    for line in lineage_mod.format_lineage(chain):
        _say(console, line)
    if not reproduce:
        return
    out = output_dir or project / "runs" / f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}"
    _say(console, f" {model} into {out} (no cache, nothing registered)", lead="\nreproducing")
    report = _run_flow_or_exit(console, "reproduction", out / "summary.json", lineage_mod.reproduce, chain=chain,
                               project=project, output_dir=out)
    for warning in report["warnings"]:
        _say(console, warning, lead="warning: ", lead_style="yellow")
    _say(console, "reproduced" if report["reproduced"] else "differs", style="green" if report["reproduced"] else "red",
         lead=f"max |Δw| between the reproduced and the registered policy: {report['max_abs_diff']:.3g} over "
              f"{report['tensors']} tensors → ", lead_style="")
    if not report["reproduced"]:
        raise typer.Exit(1)


@app.command()
def collect(
    profile: str = typer.Option("demo", help="whose policy and settings (smoke: rlhf-policy-smoke, 4 short prompts)"),
    config: Path = typer.Option(Path("params.yaml"), help="parameter file (the `collect` section)"),
    prompts: Optional[Path] = typer.Option(None, help="prompts file in any input format (default: the prepared prompts "
                                                      "of collect.split)"),
    policy: Optional[str] = typer.Option(None, help="champion (default) | models:/NAME/VERSION | NAME@ALIAS | a run's "
                                                    "output folder (its SFT model) | a model folder"),
    label_studio: Optional[str] = typer.Option(None, "--label-studio", help="Label Studio URL: create or reuse the "
                                               "ranking project and import the batch (token from $LABEL_STUDIO_API_KEY)"),
    project: Optional[str] = typer.Option(None, help="Label Studio project title (default collect.label_studio_project)"),
    k: Optional[int] = typer.Option(None, help="responses per prompt, 4..9 (collect.k)"),
    num_prompts: Optional[int] = typer.Option(None, help="prompts in the batch (collect.num_prompts)"),
    seed: Optional[int] = typer.Option(None, help="another seed draws another batch (collect.seed)"),
    set_: list[str] = typer.Option([], "--set", help="override a value: section.key=value (repeatable)"),
) -> None:
    """Sample K responses per prompt from a registered policy into a labeling batch (logged to MLflow with the policy
    version) and, with --label-studio, put it into the ranking project. Runs the Prefect flow `rlhf-collect`."""
    _quiet_defaults()
    console = _console()
    overrides = list(set_) + [f"collect.{name}={value}" for name, value in
                              (("k", k), ("num_prompts", num_prompts), ("seed", seed)) if value is not None]
    _load_config_or_exit(console, config, profile, overrides)
    if label_studio and not os.environ.get("LABEL_STUDIO_API_KEY"):
        console.print("[bold red]set LABEL_STUDIO_API_KEY[/] to the Label Studio API token (the one `make label-studio` "
                      "created the admin with, or Account & Settings → Access Token)")
        raise typer.Exit(2)
    from rlhf_pipeline.flows.collect import rlhf_collect

    project_dir = config.resolve().parent
    try:
        result = rlhf_collect(profile=profile, config_path=str(config.resolve()), project_dir=str(project_dir),
                              overrides=overrides, prompts_file=str(prompts.resolve()) if prompts else None,
                              policy=policy, label_studio_url=label_studio, label_studio_project=project)
    except Exception as exc:
        console.print(f"[bold red]collect failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    what = "reused" if result["reused"] else "sampled"
    console.print(f"labeling batch [bold]{result['batch_id']}[/] ({what}): {result['tasks']} tasks from policy "
                  f"{result['policy']['version']}\n  file: {result['batch_path']}\n  MLflow run: {result['mlflow_run_id']}",
                  highlight=False)
    for item in result["skipped"]:
        console.print(f"  prompt {item['prompt_id']} left out: {item['distinct']} distinct responses after "
                      f"{item['drawn']} samples ({item['rule']})", highlight=False)
    pushed = result.get("label_studio")
    if pushed:
        console.print(f"Label Studio: {pushed['imported']} tasks imported, {pushed['already_there']} already there; "
                      f"rank them at {pushed['url']}", highlight=False)
    console.print(f"then: rlhf import-rankings --label-studio URL --batch {result['batch_id']}", highlight=False)


@app.command("import-rankings")
def import_rankings(
    label_studio: Optional[str] = typer.Option(None, "--label-studio", help="Label Studio URL to export from (token "
                                               "from $LABEL_STUDIO_API_KEY)"),
    export: Optional[Path] = typer.Option(None, help="a Label Studio JSON export file instead of the API"),
    project: Optional[str] = typer.Option(None, help="Label Studio project title or id (default "
                                                     "collect.label_studio_project)"),
    batch: list[str] = typer.Option([], help="import only this labeling batch (repeatable; default: all)"),
    profile: str = typer.Option("demo", help="profile of the configuration"),
    config: Path = typer.Option(Path("params.yaml"), help="parameter file (data.comparisons names the feedback file)"),
    push: bool = typer.Option(True, help="`dvc push` the feedback file when the project has a DVC remote"),
) -> None:
    """Validate labelers' rankings (GX: complete permutations of the task's response ids, known batches and tasks, no
    empty annotations), convert them to K-wise comparisons and append the new ones to the feedback source; the export
    is refused whole, naming task ids and rules, when anything is wrong."""
    _quiet_defaults()
    console = _console()
    if (label_studio is None) == (export is None):
        console.print("[bold red]give exactly one of --label-studio URL and --export FILE[/]")
        raise typer.Exit(2)
    cfg = _load_config_or_exit(console, config, profile)
    from rlhf_pipeline.flows.feedback import import_rankings as run_import
    from rlhf_pipeline.flows.label_studio import LabelStudioError
    from rlhf_pipeline.tasks.feedback import ImportRefused

    try:
        report = run_import(cfg, config.resolve().parent, export_file=export, label_studio_url=label_studio,
                            label_studio_project=project, batch_ids=batch or None, push=push)
    except ImportRefused as exc:
        console.print(f"[bold red]rankings refused[/]\n{exc}", highlight=False)
        raise typer.Exit(1) from None
    except (LabelStudioError, ValueError, RuntimeError) as exc:
        console.print(f"[bold red]import failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{report['origin']}: {report['tasks']} tasks; [bold]{report['appended']} new ranked comparisons[/] "
                  f"appended to {report['path']}; {len(report['already_imported'])} imported before", highlight=False)
    for entry in report["batches"]:
        console.print(f"  batch {entry['batch_id']}: {entry['rows']} rows (policy {entry['policy_version']})",
                      highlight=False)
    if report["pending"]:
        console.print(f"  {len(report['pending'])} tasks wait for more rankings (collect.annotators_per_task)")
    if report["cancelled"]:
        console.print(f"  {report['cancelled']} skipped (cancelled) annotations set aside")
    if report["unchanged_display_order"]:
        console.print(f"  [yellow]{report['unchanged_display_order']} rankings equal the order shown[/] (submitted "
                      "without moving anything?); they are kept")
    if report["changed_after_import"]:
        console.print(f"  [yellow]{len(report['changed_after_import'])} tasks were ranked differently after their "
                      f"import; the first import is kept[/]: {', '.join(report['changed_after_import'][:10])}")
    if report["dvc"]:
        console.print(f"  {report['dvc']}", highlight=False)
    if report["appended"]:
        console.print("the data version changes with the next `rlhf retrain` (or `dvc repro prepare`)")


if __name__ == "__main__":
    app()
