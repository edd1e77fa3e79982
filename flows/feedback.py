"""``rlhf import-rankings``: labelers' rankings from Label Studio (its API, or a JSON export file) into the comparisons
source that ``params.yaml`` names (``collect.feedback_source``, a K-wise JSON-lines file), so that the next
``rlhf retrain`` trains the reward model on them; and which labeling batches a prepared data version contains.

Order of work: read the export; find each labeling batch it refers to (the project's batch file, else the batch
logged to MLflow by ``rlhf collect``); validate everything with Great Expectations
(:func:`rlhf_pipeline.tasks.feedback.validate_export`; a bad export is refused whole and nothing is written); convert
to K-wise rows; keep the rows whose task was not imported before; write the file atomically (a temporary file renamed
over it, under a file lock); ``dvc add`` it in a DVC project (and ``dvc push`` it when the project has a DVC remote),
so the data version changes. When ``dvc add`` fails the file is put back as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf_pipeline.flows import dvc
from rlhf_pipeline.flows.config import Config
from rlhf_pipeline.tasks.feedback import (
    ImportRefused,
    batches_of_rows,
    convert_rankings,
    feedback_jsonl,
    parse_export,
    read_feedback_rows,
    select_batches,
    split_new_rows,
    validate_export,
)

#: where ``rlhf collect`` logs a labeling batch in its MLflow run
BATCH_ARTIFACT_DIR = "labeling_batch"


def feedback_path(config: Config) -> Path:
    """The file of the comparisons source named ``collect.feedback_source``.

    Raises:
        ValueError: no ``data.comparisons`` source has that name, or it has no local ``path``.
    """
    name = config.collect.feedback_source
    source = next((s for s in config.data.comparisons if s.name == name), None)
    if source is None or not source.path:
        raise ValueError(f"collect.feedback_source is {name!r}, but data.comparisons has no source of that name with a "
                         "path; add one (format: kwise, optional: true), as params.yaml does")
    return Path(source.path)


def batch_path(config: Config, project: Path, batch_id: str) -> Path:
    """Where a labeling batch file lives: ``<project>/<collect.batches_dir>/<batch_id>.json``."""
    folder = Path(config.collect.batches_dir)
    return (folder if folder.is_absolute() else project / folder) / f"{batch_id}.json"


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file renamed over ``path`` (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
        tmp = Path(handle.name)
    os.replace(tmp, path)


def find_batch(config: Config, project: Path, batch_id: str) -> dict | None:
    """A labeling batch by id: the project's batch file, else the artifact of the MLflow run tagged
    ``rlhf.batch_id`` (then saved as the project's batch file); ``None`` when neither exists."""
    path = batch_path(config, project, batch_id)
    if path.is_file():
        return json.loads(path.read_text())
    from mlflow import MlflowClient

    from rlhf_pipeline.flows import tracking

    experiment_id = tracking.setup_mlflow(project, config.registry.experiment)
    client = MlflowClient()
    runs = client.search_runs([experiment_id], filter_string=f"tags.`rlhf.batch_id` = '{batch_id}'", max_results=1)
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(runs[0].info.run_id, f"{BATCH_ARTIFACT_DIR}/{batch_id}.json", tmp)
        except Exception:
            return None
        batch = json.loads(Path(local).read_text())
    write_json_atomic(path, batch)
    return batch


def read_export_file(path: Path) -> list:
    """A Label Studio JSON export file.

    Raises:
        ImportRefused: rule ``file_missing`` or ``invalid_json`` (naming the file).
    """
    if not path.is_file():
        raise ImportRefused(str(path), [{"rule": "file_missing", "task_ids": [], "detail": "no such file"}])
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportRefused(str(path), [{"rule": "invalid_json", "task_ids": [],
                                         "detail": f"not a JSON document: {exc}"}]) from None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        tmp = Path(handle.name)
    os.replace(tmp, path)


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dvc.dvc_env(), capture_output=True,
                          text=True)


def track_with_dvc(project: Path, path: Path, push: bool = True) -> str:
    """``dvc add`` the feedback file when ``project`` is a DVC repository and the file lies inside it; then
    ``dvc push`` it when a DVC remote is configured and ``push``. Returns what was done, in words.

    Raises:
        RuntimeError: ``dvc add`` failed (its message). A failed push is reported in the returned text, not raised:
            the data is in the local DVC cache and ``dvc push`` can be repeated.
    """
    if not (project / ".dvc").is_dir():
        return f"{project} is not a DVC repository: the file is not tracked by DVC"
    try:
        relative = path.resolve().relative_to(project.resolve())
    except ValueError:
        return f"{path} lies outside the DVC project {project}: not tracked by DVC"
    proc = _dvc(project, "add", "--quiet", str(relative))
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc add {relative}` failed in {project}: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    done = f"dvc add {relative} (commit {relative}.dvc to git)"
    if push and dvc.has_dvc_remote(project):
        pushed = _dvc(project, "push", "--quiet", f"{relative}.dvc")
        done += "; dvc push" + ("" if pushed.returncode == 0 else
                                f" FAILED ({(pushed.stderr or pushed.stdout).strip()[-300:]}); run `dvc push` again")
    return done


def append_rows(project: Path, path: Path, rows: list[dict], push: bool = True) -> dict:
    """Append the rows whose task id is new to the feedback file, atomically and under a file lock, then track it with
    DVC (:func:`track_with_dvc`); when ``dvc add`` fails the file's previous content is restored and the error raised.

    Returns:
        ``{"appended", "already_imported" (task ids), "changed_after_import" (task ids), "dvc", "batches" (of the
        appended rows)}``.

    Raises:
        ValueError: the existing file has a line that is not a JSON object (it is left as it is).
    """
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        old = path.read_bytes() if path.exists() else None
        text = old.decode("utf-8") if old else ""
        new, same, changed = split_new_rows(read_feedback_rows(text, str(path)), rows)
        outcome = {"appended": len(new), "already_imported": same, "changed_after_import": changed, "dvc": None,
                   "batches": batches_of_rows(new)}
        if not new:
            return outcome
        if text and not text.endswith("\n"):
            text += "\n"
        _write_atomic(path, (text + feedback_jsonl(new)).encode("utf-8"))
        try:
            outcome["dvc"] = track_with_dvc(project, path, push)
        except BaseException:
            if old is None:
                path.unlink(missing_ok=True)
            else:
                _write_atomic(path, old)
            raise
    return outcome


def import_rankings(
    config: Config,
    project: Path,
    export_file: str | Path | None = None,
    label_studio_url: str | None = None,
    label_studio_project: str | None = None,
    batch_ids: list[str] | None = None,
    push: bool = True,
) -> dict:
    """Import rankings (see the module docstring) from ``export_file`` or from the Label Studio project
    ``label_studio_project`` (default ``collect.label_studio_project``) at ``label_studio_url`` (token from
    ``LABEL_STUDIO_API_KEY``).

    Args:
        batch_ids: import only these labeling batches (default: every task of the export).
        push: ``dvc push`` the file when the project has a DVC remote.

    Returns:
        ``{"origin", "path", "batches" (of the appended rows), "appended", "already_imported",
        "changed_after_import", "pending", "cancelled", "unchanged_display_order", "tasks", "validation", "dvc"}``.

    Raises:
        ImportRefused: the export failed validation (rules and task ids named); nothing was written.
        rlhf_pipeline.flows.label_studio.LabelStudioError: the server is unreachable or refuses the token.
        ValueError: no feedback source is configured, or the feedback file is corrupt.
        RuntimeError: ``dvc add`` failed (the file was restored).
    """
    path = feedback_path(config)
    if (export_file is None) == (label_studio_url is None):
        raise ValueError("give exactly one of an export file and a Label Studio URL")
    if export_file is not None:
        export_file = Path(export_file)
        origin = str(export_file)
        data = read_export_file(export_file)
    else:
        from rlhf_pipeline.flows.label_studio import LabelStudio, LabelStudioError

        client = LabelStudio(label_studio_url)
        ref = label_studio_project or config.collect.label_studio_project
        found = client.project(ref)
        if found is None:
            raise LabelStudioError(f"no Label Studio project {ref!r} at {client.url} (run `rlhf collect --label-studio "
                                   f"{client.url}` first, or give --project)")
        origin = f"Label Studio {client.url} project {found['title']!r} (id {found['id']})"
        data = client.export(found["id"])
    tasks = select_batches(parse_export(data, origin), batch_ids)
    batches = {}
    for batch_id in sorted({t["batch_id"] for t in tasks if t["batch_id"]}):
        batch = find_batch(config, project, str(batch_id))
        if batch is not None:
            batches[batch_id] = batch
    validation = validate_export(tasks, batches, origin)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows, report = convert_rankings(tasks, batches, origin, stamp)
    outcome = append_rows(project, path, rows, push)
    return {"origin": origin, "path": str(path), **report, **outcome, "validation": validation}


def labeling_batches(config: Config) -> list[dict]:
    """The labeling batches whose rankings are in the prepared data: the prepared comparisons of the
    ``collect.feedback_source`` source, traced by their source row to the feedback file's ``batch_id`` and
    ``policy_version``. ``[]`` when there is no feedback source or file.

    Returns:
        ``[{"batch_id", "rows", "policy_version"}]`` in first-seen order.
    """
    from rlhf_pipeline.tasks.datasets import load_prepared
    from rlhf_pipeline.tasks.readers import read_rows

    try:
        path = feedback_path(config)
    except ValueError:
        return []
    if not path.is_file():
        return []
    frame = load_prepared(config.data.prepared_dir, "comparisons")
    used = frame.loc[frame["source"] == config.collect.feedback_source, "source_row"]
    if used.empty:
        return []
    rows = {number: row for number, row in read_rows(path) if isinstance(row, dict)}
    return batches_of_rows([rows[int(n)] for n in used if int(n) in rows])
