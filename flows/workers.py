"""Running a stage on N workers: in this process when ``distributed.workers`` is 1, else on Ray Train.

With several workers the stage function runs in every worker of a Ray Train ``TorchTrainer`` (``ScalingConfig``:
``workers`` processes, one GPU each on CUDA, one CPU each otherwise). Ray starts the workers, places them on the
cluster's nodes and initialises ``torch.distributed`` (NCCL on GPUs, gloo on CPUs); the stage finds its rank with
:func:`rlhf_pipeline.models.distributed.world`. Without an address a local Ray is started on this machine (bound to
127.0.0.1); with ``distributed.ray_address`` (or ``RAY_ADDRESS``) the stage joins that cluster, which may span nodes
(KubeRay, ``infra/kuberay-cluster.yaml``). Worker 0 logs the stage's metrics to its nested MLflow run and writes the
stage's result; the Prefect task waits for the trainer and still sees one task per stage.

A failing or killed worker fails the stage within the collective timeout (``distributed.timeout_s``): Ray does not
retry (``FailureConfig(max_failures=0)``); a rerun resumes from the stage's last checkpoint.

In a cluster of several machines ``output_dir`` (runs/) and the prepared data must be on storage every node sees (the
same path: an NFS or a Kubernetes volume), as must ``RLHF_CACHE_DIR`` for the base model.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rlhf_pipeline.tasks.stage import Section, StageResult

RESULT_FILE = "worker-result.json"
_connected: str | None = None  # the address this process's Ray was started for (None: a local Ray)
WORKERS_DIR = "ray-workers"  # one JSON per worker: rank, pid, node id, host (where each ran; what to kill in a test)


class DistributedConfig(Section):
    """The ``distributed`` section: how many worker processes run each training and evaluation stage, and where.

    It is not part of any cache key: N workers train as one process does with the same global batch (up to float
    rounding), so a stage run with 2 workers is reused by a run with 1.
    """

    workers: int = Field(1, ge=1)  # processes in all (1: in this process, without Ray)
    workers_per_node: int | None = Field(None, ge=1)  # 1: one per node (STRICT_SPREAD); else Ray packs them
    ray_address: str | None = None  # default $RAY_ADDRESS, else a local Ray on this machine
    shard: bool = True  # FSDP2 per decoder layer; false: replicate whole models, all-reduce gradients
    timeout_s: int = Field(600, ge=10)  # a collective waiting longer fails the stage (a dead or hung worker)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU

    @model_validator(mode="after")
    def _check_nodes(self) -> "DistributedConfig":
        if self.workers_per_node and self.workers % self.workers_per_node:
            raise ValueError(f"distributed.workers ({self.workers}) must be a multiple of "
                             f"distributed.workers_per_node ({self.workers_per_node})")
        return self


def run_stage_function(stage, config, inputs: dict, output_dir: Path, log, run_id: str | None = None,
                       tracking_uri: str | None = None) -> StageResult:
    """Call ``stage``'s function with the sections the stage table names and ``inputs``: here when
    ``distributed.workers`` is 1, else in every worker of a Ray Train run (worker 0's result is returned).

    Args:
        stage: the :class:`~rlhf_pipeline.flows.stages.Stage`.
        config: the run's :class:`~rlhf_pipeline.flows.config.Config`.
        inputs: the stage function's keyword inputs (paths, small dicts: they travel to the workers as JSON).
        output_dir: the stage's folder (on storage every node sees, in a cluster).
        log: the metric logger in this process (worker 0 logs to MLflow run ``run_id`` itself).

    Raises:
        RuntimeError: when a worker fails, is killed or hangs past ``distributed.timeout_s`` (the workers' error is in
            the message).
    """
    sections = [getattr(config, name) for name in stage.sections]
    dist_cfg = config.distributed
    if dist_cfg.workers == 1:
        return stage.function()(*sections, **inputs, output_dir=output_dir, log=log)
    from rlhf_pipeline.models.loading import resolve_device

    return _run_on_ray(stage, {name: s.model_dump(mode="json") for name, s in zip(stage.sections, sections)},
                       inputs, output_dir, dist_cfg, resolve_device(config.model.device).type == "cuda", run_id,
                       tracking_uri)


def ray_address(dist_cfg: DistributedConfig) -> str | None:
    """The Ray cluster to join: ``distributed.ray_address``, else ``$RAY_ADDRESS``, else ``None`` (a local Ray)."""
    return dist_cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def _worker_env(tracking_uri: str | None) -> dict[str, str]:
    """The environment the workers need from this process (for a cluster whose workers did not inherit it)."""
    keep = ("RLHF_CACHE_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def _run_on_ray(stage, sections: dict, inputs: dict, output_dir: Path, dist_cfg: DistributedConfig, use_gpu: bool,
                run_id: str | None, tracking_uri: str | None) -> StageResult:
    if not ray_address(dist_cfg):  # a private cluster: only this process and its workers hold its token (set before
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray is imported: its core reads them when it loads)
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    address = ray_address(dist_cfg)
    global _connected
    if ray.is_initialized() and _connected != address:
        ray.shutdown()  # connected to another cluster earlier in this process
    _connected = address
    if not ray.is_initialized():
        if address:
            ray.init(address=address, runtime_env={"env_vars": _worker_env(tracking_uri)}, log_to_driver=True)
        else:  # a private Ray on this machine, reachable from it only
            ray.init(num_cpus=max(dist_cfg.workers, os.cpu_count() or 1), include_dashboard=False,
                     _node_ip_address="127.0.0.1", runtime_env={"env_vars": _worker_env(tracking_uri)})
    output_dir.mkdir(parents=True, exist_ok=True)
    result_file = output_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)
    backend = dist_cfg.backend if dist_cfg.backend != "auto" else ("nccl" if use_gpu else "gloo")
    resources = {"CPU": 1, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"entry": stage.entry, "sections": sections, "inputs": inputs,
                           "output_dir": str(output_dir), "run_id": run_id, "shard": dist_cfg.shard},
        scaling_config=ScalingConfig(num_workers=dist_cfg.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy="STRICT_SPREAD" if dist_cfg.workers_per_node == 1 else "PACK"),
        torch_config=TorchConfig(backend=backend, timeout_s=dist_cfg.timeout_s),
        run_config=RunConfig(name=f"{stage.name}-{run_id or 'run'}", storage_path=str(output_dir / "ray"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise RuntimeError(f"stage {stage.name} failed on {dist_cfg.workers} workers: {_first_lines(exc)}") from None
    if not result_file.exists():
        raise RuntimeError(f"stage {stage.name}: worker 0 wrote no result to {result_file}")
    payload = json.loads(result_file.read_text())
    return StageResult(payload["stage"], payload["paths"], payload["metrics"])


def _first_lines(exc: BaseException, n: int = 12) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return "\n".join(lines[:n]) + (f"\n... ({len(lines) - n} more lines)" if len(lines) > n else "")


def _worker_loop(config: dict) -> None:
    """What each Ray worker runs: the stage function with its sections rebuilt from JSON; worker 0 logs to the stage's
    MLflow run and writes the result for the driver. ``torch.distributed`` is initialised by Ray Train."""
    import importlib
    import typing

    import ray
    import ray.train

    from rlhf_pipeline.models.distributed import SHARD_ENV
    from rlhf_pipeline.tasks.stage import no_log

    os.environ[SHARD_ENV] = "1" if config["shard"] else "0"
    module, name = config["entry"].split(":", 1)
    function = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(function)
    params = list(typing.get_type_hints(function))  # annotated parameters in order, then "return"
    sections = [hints[param].model_validate(config["sections"][section])
                for param, section in zip(params, config["sections"])]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    where = Path(config["output_dir"]) / WORKERS_DIR
    where.mkdir(parents=True, exist_ok=True)
    (where / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": context.get_world_size(), "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}))
    log = no_log
    if rank == 0 and config["run_id"]:
        from rlhf_pipeline.flows.tracking import MetricSink

        log = MetricSink(config["run_id"])
    result = function(*sections, **config["inputs"], output_dir=Path(config["output_dir"]), log=log)
    if rank == 0:
        if hasattr(log, "flush"):
            log.flush()
        target = Path(config["output_dir"]) / RESULT_FILE
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as fh:
            json.dump({"stage": result.stage, "paths": result.paths, "metrics": result.metrics}, fh, default=str)
        os.replace(fh.name, target)
