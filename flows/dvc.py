"""DVC and git, as subprocesses in the project folder: the ``prepare`` stage (``dvc repro prepare`` runs
``rlhf prepare``, which ingests, gates and writes ``data/prepared``), ``dvc pull`` from a remote, and the commit a run
records.

DVC runs as a subprocess in the project folder (its Python API resolves targets against the process's working
directory), with this environment's ``bin`` first on ``PATH`` so the stage's command is this installation's ``rlhf``.

Data versions, and why nothing is lost (:func:`prepare_version`):

- the stage's output ``data/prepared`` is ``persist: true`` in ``dvc.yaml``, so DVC does not delete it before running
  ``rlhf prepare``; ``rlhf prepare`` builds and gates the new version in memory, writes it into a temporary folder
  beside ``data/prepared`` and swaps it in by rename only after the gate passed. A failed gate or an unreadable source
  leaves the last good version (and ``dvc.lock``) as they were, and the error says so. The DVC output keeps holding
  the data itself, so ``dvc push`` / ``dvc pull`` / ``dvc checkout`` work as before and its hash is the data version;
- preparing holds the data lock (:func:`rlhf_pipeline.flows.locks.data_lock`): a second prepare waits;
- a run reads ``data/versions/<data version>/``, an immutable copy made under the lock, never ``data/prepared``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from rlhf_pipeline.flows.config import Config, load_config
from rlhf_pipeline.flows.locks import DATA_LOCK_HELD


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
    """Whether ``project_dir`` is a DVC project with a pipeline (``.dvc/`` and ``dvc.yaml``)."""
    return (project_dir / ".dvc").is_dir() and (project_dir / "dvc.yaml").exists()


def dvc_params_match(project: Path, config: Config) -> bool:
    """Whether the DVC ``prepare`` stage (which reads ``project/params.yaml``) would use this run's data section."""
    params = project / "params.yaml"
    return params.exists() and load_config(params).data == config.data


def uses_dvc(project: Path, config: Config) -> bool:
    """Whether this run's data is prepared by DVC: a DVC project whose ``params.yaml`` has this run's data section
    (a ``--config`` elsewhere or a ``--set data.*`` prepares without DVC)."""
    return is_dvc_repo(project) and dvc_params_match(project, config)


def failure_file(config: Config) -> Path:
    """Where ``rlhf prepare`` writes why it failed (JSON ``{"kind", "message"}``; beside the DVC output, which holds
    only data), so the flow that ran ``dvc repro prepare`` can raise the same error."""
    return Path(config.data.prepared_dir).parent / "prepare_failure.json"


def current_version(config: Config) -> str | None:
    """The data version ``data/prepared`` holds now (``None`` when there is none or it is incomplete)."""
    from rlhf_pipeline.tasks.datasets import data_version

    try:
        return data_version(config.data.prepared_dir)
    except (FileNotFoundError, OSError):
        return None


def kept_note(config: Config) -> str:
    """What a failed prepare left in place: the last good version, untouched (a failure never publishes)."""
    version = current_version(config)
    where = Path(config.data.prepared_dir)
    if version is None:
        return f"nothing was published ({where} holds no data version yet)"
    return f"the last good data version {version} in {where} is kept; nothing new was published"


def write_failure(config: Config, exc: BaseException) -> None:
    """Record a failed prepare (``ValidationFailed`` or ``DataError``) for :func:`raise_failure`."""
    from rlhf_pipeline.tasks.validate import ValidationFailed

    path = failure_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "validation" if isinstance(exc, ValidationFailed) else "data"
    path.write_text(json.dumps({"kind": kind, "message": str(exc)}))


def raise_failure(config: Config) -> None:
    """Raise the error a failed ``rlhf prepare`` recorded, with what was kept; nothing when none was recorded.

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: the gate failed.
        rlhf_pipeline.tasks.readers.DataError: a source could not be read.
    """
    from rlhf_pipeline.tasks.readers import DataError
    from rlhf_pipeline.tasks.validate import ValidationFailed

    path = failure_file(config)
    try:
        failure = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    message = f"{failure['message']}\n{kept_note(config)}"
    raise (ValidationFailed if failure.get("kind") == "validation" else DataError)(message)


def dvc_env(data_lock_held: Path | None = None) -> dict[str, str]:
    """The environment for DVC subprocesses: this interpreter's ``bin`` first on ``PATH`` (the stage's ``rlhf``) and,
    when the caller holds the data lock, the marker that lets the stage's ``rlhf prepare`` run under it."""
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if data_lock_held is not None:
        env[DATA_LOCK_HELD] = str(data_lock_held)
    return env


def _dvc(project: Path, *args: str, data_lock_held: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_env(data_lock_held),
                          capture_output=True, text=True)


def token_counter(config: Config) -> Callable[[str], int]:
    """Count tokens with the configured model's tokenizer (for the GX length expectations): ``count(text)``, and
    ``count.batch(texts)`` that encodes a batch at once (in parallel with a fast tokenizer; the same counts)."""
    from rlhf_pipeline.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(config.model.base, config.model.cache_dir))
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def batch(texts: list[str]) -> list[int]:
        if backend is not None:
            return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    count.batch = batch
    if backend is not None and backend.normalizer is None and type(backend.pre_tokenizer).__name__ == "ByteLevel" \
            and type(backend.model).__name__ == "BPE":
        # byte-level BPE (SmolLM2, GPT-2, Llama 3...): every token covers at least one byte of the text, so a text of
        # n UTF-8 bytes has at most n tokens (+1 for an added prefix space); the gate tokenizes only longer texts
        count.upper_bound = lambda text: len(text.encode("utf-8", "surrogatepass")) + 1
    return count


def prepare_data(config: Config, strict: bool = False) -> dict:
    """Ingest + GX gate + publish the prepared datasets (what ``rlhf prepare`` / the DVC ``prepare`` stage run).

    The new version is built and gated in memory and written into a temporary folder beside ``data/prepared``, which
    replaces it by one rename only after the gate passed; callers hold :func:`rlhf_pipeline.flows.locks.data_lock`.

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: the gate failed (nothing is written; the last version is kept).
        rlhf_pipeline.tasks.readers.DataError: a source cannot be read (likewise).
    """
    from rlhf_pipeline.tasks.validate import run_validate

    return run_validate(config.data, count_tokens=token_counter(config), prepared_dir=config.data.prepared_dir,
                        strict=strict)


def ensure_optional_sources(config: Config) -> list[Path]:
    """Create an empty file for each ``optional`` data source that does not exist yet (the human-feedback comparisons
    before the first ``rlhf import-rankings``): DVC refuses to run a stage whose dependency is missing, and an empty
    file adds no rows. Returns the files created."""
    created = []
    for source in [*config.data.comparisons, *config.data.demonstrations]:
        if source.optional and source.path and not Path(source.path).exists():
            Path(source.path).parent.mkdir(parents=True, exist_ok=True)
            Path(source.path).touch()
            created.append(Path(source.path))
    return created


#: DVC's messages when another DVC process holds the repository or the stage's outputs
_DVC_BUSY = ("is busy", "Unable to acquire lock")


def dvc_repro_prepare(project_dir: Path, config: Config, busy_timeout_s: float = 600) -> None:
    """``dvc repro prepare`` in ``project_dir`` (runs ``rlhf prepare`` only when its inputs changed). The caller holds
    the data lock, which the stage's ``rlhf prepare`` inherits; a DVC lock held by a ``dvc`` command started by hand is
    waited for (up to ``busy_timeout_s``).

    The DVC stage's output is ``persist``-ent (``dvc.yaml``): DVC does not delete ``data/prepared`` before running the
    command, so a failing prepare leaves the last good version in place and ``dvc.lock`` unchanged.

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: the prepare command failed its GX gate (the message names rows
            and expectations, and the version that was kept).
        rlhf_pipeline.tasks.readers.DataError: a source could not be read (likewise).
        RuntimeError: any other DVC failure, with DVC's own message.
    """
    from rlhf_pipeline.flows.locks import data_lock_path

    failure = failure_file(config)
    deadline = time.monotonic() + busy_timeout_s
    ensure_optional_sources(config)
    while True:
        failure.unlink(missing_ok=True)
        proc = _dvc(project_dir, "repro", "prepare", data_lock_held=data_lock_path(config.data.prepared_dir))
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 and any(b in output for b in _DVC_BUSY) and time.monotonic() < deadline:
            time.sleep(2)  # a `dvc` command started by hand holds DVC's own lock: wait for it
            continue
        break
    for line in output.splitlines():
        if line.strip():
            print(line, file=sys.stderr)
    if proc.returncode != 0:
        raise_failure(config)
        raise RuntimeError(f"`dvc repro prepare` failed in {project_dir}: {proc.stderr.strip()[-2000:]}")


def prepare_version(project: Path, config: Config, pull: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """Make this run's data version: under the data lock, (``dvc pull`` when ``pull`` and a remote is configured,)
    ``dvc repro prepare`` in a DVC project whose ``params.yaml`` has this data section, else the same without DVC;
    then the immutable copy of the result that the run reads (:func:`rlhf_pipeline.tasks.datasets.snapshot_version`).

    Returns:
        the version's folder, ``data/versions/<data version>``.

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: the gate failed; the last good version is kept, and said so.
        rlhf_pipeline.tasks.readers.DataError: a source cannot be read; likewise.
        RuntimeError: a DVC command failed.
        TimeoutError: another prepare held the data lock for more than an hour.
    """
    from rlhf_pipeline.flows.locks import data_lock
    from rlhf_pipeline.tasks.datasets import snapshot_version
    from rlhf_pipeline.tasks.readers import DataError
    from rlhf_pipeline.tasks.validate import ValidationFailed

    with data_lock(config.data.prepared_dir, on_wait=log):
        if uses_dvc(project, config):
            if pull and has_dvc_remote(project):
                log(f"dvc pull: {dvc_pull(project)}")
            log(f"dvc repro prepare (DVC-versioned data in {config.data.prepared_dir})")
            dvc_repro_prepare(project, config)
        else:
            log("preparing the data without DVC versioning: " + (
                f"the data section differs from {project / 'params.yaml'} (--config/--set)" if is_dvc_repo(project)
                else f"{project} is not a DVC repository"))
            try:
                prepare_data(config)
            except (ValidationFailed, DataError) as exc:
                raise type(exc)(f"{exc}\n{kept_note(config)}") from None
        return snapshot_version(config.data.prepared_dir)


def has_dvc_remote(project: Path) -> bool:
    """Whether the DVC project has a remote configured (``dvc remote list`` prints one)."""
    proc = _dvc(project, "remote", "list")
    return proc.returncode == 0 and bool(proc.stdout.strip())


def dvc_pull(project: Path) -> str:
    """``dvc pull`` in ``project`` (the caller holds the data lock); returns the end of its output.

    Raises:
        RuntimeError: when DVC fails (its message included).
    """
    proc = _dvc(project, "pull")
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc pull` failed in {project}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()[-500:] or "up to date"
