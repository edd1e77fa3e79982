"""Stage caching: reuse a stage whose inputs are unchanged.

A stage's cache key is a sha256 over everything its output depends on:

- the data version (content hash of the prepared datasets, :func:`tasks.data.data_version`),
- its own config section and the ``model`` section (base model, seed, device),
- the keys of the upstream stages it consumes (so a new SFT model invalidates RM, PPO and evaluation),
- the code version of the stage: the content of ``models/*.py``, ``tasks/common.py``, ``tasks/data.py`` and the
  stage's own module(s).

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

import hashlib
import json
from pathlib import Path

from flows.config import Config

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

#: stage -> (config sections in its key, upstream stages in its key, modules of its code besides the shared ones)
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "sft": (("sft", "model"), (), ("tasks/sft.py",)),
    "reward": (("reward", "model"), ("sft",), ("tasks/reward.py",)),
    "ppo": (("ppo", "model"), ("sft", "reward"), ("tasks/ppo.py",)),
    "evaluate": (("evaluate", "model"), ("sft", "reward", "ppo"), ("tasks/evaluate.py", "tasks/report.py",
                                                                    "tasks/ppo.py")),
}
SHARED_CODE = ("models/*.py", "tasks/common.py", "tasks/data.py")


def code_version(stage: str | None = None) -> str:
    """sha256 (16 hex digits) of the source files a stage runs; of all of ``flows/``, ``tasks/`` and ``models/`` when
    ``stage`` is ``None`` (the pipeline's code version, a lineage tag).

    Raises:
        KeyError: for a stage without inputs (``validate`` is DVC's job and is never cached).
    """
    if stage is None:
        patterns: tuple[str, ...] = ("flows/*.py", "tasks/*.py", "models/*.py")
    else:
        patterns = SHARED_CODE + STAGE_INPUTS[stage][2]
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(PACKAGE_ROOT.glob(pattern)):
            digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, config: Config, data_version: str, upstream: dict[str, str]) -> str:
    """The cache key of ``stage`` (sha256, 24 hex digits).

    Args:
        upstream: ``{stage: key}`` of the stages run (or reused) before it; the ones in :data:`STAGE_INPUTS` count.

    Raises:
        KeyError: when an upstream stage this one depends on has no key.
    """
    sections, deps, _ = STAGE_INPUTS[stage]
    payload = {
        "stage": stage,
        "data_version": data_version,
        "config": {name: getattr(config, name).model_dump(mode="json") for name in sections},
        "upstream": {name: upstream[name] for name in deps},
        "code": code_version(stage),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def find_reusable(experiment_id: str, stage: str, key: str) -> dict | None:
    """The newest finished run of ``stage`` with cache key ``key`` whose outputs are still on disk.

    Returns:
        ``{"paths", "metrics", "mlflow_run_id", "output_dir"}`` of that run (what the stage's task returns), or
        ``None`` on a miss.
    """
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`rlhf.cache_key` = '{key}' and tags.`rlhf.stage` = '{stage}' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        if run.data.tags.get("rlhf.reused_run_id"):
            continue  # a record of an earlier reuse; the original run is the one to point at
        folder = run.data.tags.get("rlhf.output_dir")
        if not folder:
            continue
        result_file = Path(folder) / "result.json"
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            continue
        if result.get("cache_key") != key:
            continue
        if not all(Path(p).exists() for p in result.get("paths", {}).values()):
            continue
        return {"paths": result["paths"], "metrics": result["metrics"], "mlflow_run_id": run.info.run_id,
                "output_dir": folder}
    return None
