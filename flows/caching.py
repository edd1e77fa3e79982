"""Stage caching: reuse a stage whose inputs are unchanged.

A stage's cache key is a sha256 over everything its output depends on (:func:`stage_key`):

- the data version (content hash of the prepared datasets, :func:`rlhf_pipeline.tasks.datasets.data_version`),
- the configuration sections the stage reads (:data:`rlhf_pipeline.flows.stages.STAGES`: exactly the sections its
  function takes),
- the keys of the upstream stages it consumes (so a new SFT model invalidates RM, PPO and evaluation),
- the code version of the stage: the content of the stage's module and of every ``rlhf_pipeline.tasks`` /
  ``rlhf_pipeline.models`` module it imports, directly or not (read from the source with ``ast``).

Finished stage runs carry their key as the MLflow tag ``rlhf.cache_key``; the stage's ``result.json`` on disk carries it
too. A stage is reused when a ``FINISHED`` MLflow run with its key exists *and* that run's output folder still holds a
``result.json`` with the same key and every path it lists (a deleted or overwritten folder is a cache miss, never a
stale model). Prefect's own task caching is not used: its records live in one machine's result storage and cannot see
whether the model files still exist, while MLflow is shared by every worker and shows what was reused.

Why the champion reward model (which may pick the SFT checkpoint) is *not* part of the SFT key: the champion moves after
every promotion, so including it would retrain SFT on every run even when nothing a user changed; the champion is
consulted whenever SFT does run (new data, new SFT settings, new code).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

from rlhf_pipeline.flows.config import Config
from rlhf_pipeline.flows.stages import STAGE

#: the folder holding ``flows/``, ``tasks/`` and ``models/`` (the project in a checkout, the package when installed)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rlhf_pipeline"
#: the code of the pipeline as a whole (the lineage tag ``rlhf.code_version``)
PIPELINE_CODE = ("flows", "tasks", "models")


def _module_file(module: str) -> Path | None:
    """The source file of an ``rlhf_pipeline`` module (``rlhf_pipeline.tasks.sft`` -> ``tasks/sft.py``)."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo += node.orelse
            continue
        todo += list(ast.iter_child_nodes(node))


@functools.lru_cache(maxsize=None)
def code_files(module: str) -> tuple[Path, ...]:
    """The source files of ``module`` and of every ``rlhf_pipeline`` module it imports, transitively (imports inside
    functions included), sorted; only ``tasks`` and ``models`` are followed, the layers a stage may use."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            todo += [n for n in names if n.startswith((f"{PACKAGE}.tasks", f"{PACKAGE}.models"))]
    return tuple(sorted(set(seen.values())))


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_version(stage: str | None = None) -> str:
    """sha256 (16 hex digits) of the source files a stage runs (:func:`code_files` of its module); of all of
    ``flows/``, ``tasks/`` and ``models/`` when ``stage`` is ``None`` (the pipeline's code version, a lineage tag).

    Raises:
        KeyError: for an unknown stage, or one that is never cached (``validate`` is DVC's job).
    """
    if stage is None:
        return _digest(sorted(p for folder in PIPELINE_CODE for p in (PACKAGE_ROOT / folder).glob("*.py")))
    if not STAGE[stage].cached:
        raise KeyError(f"stage {stage!r} is not cached: it has no code version of its own")
    return _digest(code_files(STAGE[stage].module))


def stage_key(stage: str, config: Config, data_version: str, upstream: dict[str, str]) -> str:
    """The cache key of ``stage`` (sha256, 24 hex digits).

    Args:
        upstream: ``{stage: key}`` of the stages run (or reused) before it; the ones the stage consumes count.

    Raises:
        KeyError: when an upstream stage this one depends on has no key.
    """
    declared = STAGE[stage]
    payload = {
        "stage": stage,
        "data_version": data_version,
        "config": {name: getattr(config, name).model_dump(mode="json") for name in declared.sections},
        "upstream": {name: upstream[name] for name in declared.upstream},
        "code": code_version(stage),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def file_digests(path: str | Path) -> dict[str, str]:
    """``{file: sha256}`` of a file, or of every file under a folder (paths as given plus the relative part), sorted:
    what a stage wrote, recorded in its ``result.json`` when it finishes and checked before it is reused."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = {}
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        out[str(file)] = digest.hexdigest()
    return out


def outputs_digest(paths) -> str:
    """One sha256 over the contents of ``paths`` (files or folders; names relative to each path, so a copy elsewhere
    has the same digest): the identity of a model's weights for the registry."""
    digest = hashlib.sha256()
    for path in paths:
        root = Path(path)
        for file, sha in file_digests(root).items():
            relative = Path(file).relative_to(root).as_posix() if root.is_dir() else root.name
            digest.update(f"{relative}\0{sha}\n".encode())
    return digest.hexdigest()


def check_digests(recorded: dict[str, str], paths) -> str | None:
    """Compare the files under ``paths`` with the digests recorded when they were written.

    Returns:
        ``None`` when they match, else the first problem naming the file (missing, changed, or not recorded).
    """
    current: dict[str, str] = {}
    for path in paths:
        if not Path(path).exists():
            return f"{path} is missing"
        current.update(file_digests(path))
    for file, sha in recorded.items():
        if file not in current:
            return f"{file} is missing"
        if current[file] != sha:
            size = Path(file).stat().st_size
            return f"{file} differs from what was written ({size} bytes now; sha256 {current[file][:12]}, recorded " \
                   f"{sha[:12]})"
    extra = sorted(set(current) - set(recorded))
    if extra:
        return f"{extra[0]} was added after the stage finished"
    return None
