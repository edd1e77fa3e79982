"""DVC and git, as subprocesses in the project folder: the ``prepare`` stage (``dvc repro prepare`` runs
``rlhf prepare``, which ingests, gates and writes ``data/prepared``), ``dvc pull`` from a remote, and the commit a run
records.

DVC runs as a subprocess in the project folder (its Python API resolves targets against the process's working
directory), with this environment's ``bin`` first on ``PATH`` so the stage's command is this installation's ``rlhf``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from rlhf_pipeline.flows.config import Config, load_config


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
    """Where ``rlhf prepare`` writes the gate's failure message (outside the DVC output, which DVC clears)."""
    return Path(config.data.prepared_dir).parent / "validation_failure.txt"


def dvc_env() -> dict[str, str]:
    """The environment for DVC subprocesses: this interpreter's ``bin`` first on ``PATH`` (the stage's ``rlhf``)."""
    return dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_env(), capture_output=True,
                          text=True)


def token_counter(config: Config) -> Callable[[str], int]:
    """Count tokens with the configured model's tokenizer (for the GX length expectations)."""
    from rlhf_pipeline.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(config.model.base, config.model.cache_dir))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare_data(config: Config, strict: bool = False) -> dict:
    """Ingest + GX gate + write the prepared datasets (what ``rlhf prepare`` / the DVC ``prepare`` stage run).

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: the gate failed (nothing is written).
        rlhf_pipeline.tasks.readers.DataError: a source cannot be read.
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


def dvc_repro_prepare(project_dir: Path, config: Config) -> None:
    """``dvc repro prepare`` in ``project_dir`` (runs ``rlhf prepare`` only when its inputs changed).

    Raises:
        rlhf_pipeline.tasks.validate.ValidationFailed: when the prepare command failed its GX gate (the failure file
            it wrote is read back so the message names rows and expectations).
        RuntimeError: any other DVC failure, with DVC's own message.
    """
    from rlhf_pipeline.tasks.validate import ValidationFailed

    failure = failure_file(config)
    failure.unlink(missing_ok=True)
    ensure_optional_sources(config)
    proc = _dvc(project_dir, "repro", "prepare")
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            print(line, file=sys.stderr)
    if proc.returncode != 0:
        if failure.exists():
            raise ValidationFailed(failure.read_text())
        raise RuntimeError(f"`dvc repro prepare` failed in {project_dir}: {proc.stderr.strip()[-2000:]}")


def has_dvc_remote(project: Path) -> bool:
    """Whether the DVC project has a remote configured (``dvc remote list`` prints one)."""
    proc = _dvc(project, "remote", "list")
    return proc.returncode == 0 and bool(proc.stdout.strip())


def dvc_pull(project: Path) -> str:
    """``dvc pull`` in ``project``; returns the end of its output.

    Raises:
        RuntimeError: when DVC fails (its message included).
    """
    proc = _dvc(project, "pull")
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc pull` failed in {project}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()[-500:] or "up to date"
