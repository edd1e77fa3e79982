"""MLflow tracking for a flow run: one parent run, one nested run per stage, step metrics as they happen.

The runs are created through ``MlflowClient`` with explicit ``mlflow.parentRunId`` tags rather than the fluent run
stack, so nesting holds whichever thread a Prefect task runs on.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

from rlhf_pipeline.tasks.stage import numeric_metrics


def tracking_uri(project_dir: str | Path = ".") -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in ``project_dir`` (the registry needs a database)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(project_dir).resolve() / 'mlflow.db')}"


def setup_mlflow(project_dir: str | Path, experiment: str) -> str:
    """Point MLflow at the tracking URI, create the experiment if needed; returns its id.

    Artifacts of a new experiment go to ``project_dir/mlartifacts`` unless the server decides.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(project_dir)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(project_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except Exception:  # created by a concurrent run
        return client.get_experiment_by_name(experiment).experiment_id


def start_parent_run(experiment_id: str, run_name: str, params: dict[str, str], tags: dict[str, str]) -> str:
    """Create the flow's parent run (left open until :func:`end_run`); returns its id."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a user opens a run (markdown): the MLflow server's page, or the command that starts a UI on a local
    store."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"[MLflow run `{run_id}`]({tracking_uri.rstrip('/')}/{page})"
    return (f"MLflow run `{run_id}` (experiment {experiment_id}); open it with `mlflow ui --host 127.0.0.1 "
            f"--backend-store-uri {tracking_uri}` then http://127.0.0.1:5000/{page}")


def log_metrics_batch(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log ``metrics`` (numeric entries only) on ``run_id`` in one call."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches of 100 (MLflow's limit per call), values cut to MLflow's 6000 characters."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run with ``FINISHED`` or ``FAILED``."""
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


class MetricSink:
    """A :class:`rlhf_pipeline.tasks.stage.MetricLogger` writing to one MLflow run (buffers, flushes every
    ``flush_every`` calls)."""

    def __init__(self, run_id: str, flush_every: int = 1):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.run_id = run_id
        self.flush_every = flush_every
        self._buffer: list = []
        self._calls = 0

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._calls += 1
        if self._calls % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:500], self._buffer[500:]
            self.client.log_batch(self.run_id, metrics=chunk)


@contextlib.contextmanager
def stage_run(
    experiment_id: str, parent_run_id: str, stage: str, params: dict[str, str], tags: dict[str, str]
) -> Iterator[tuple[str, MetricSink]]:
    """A nested MLflow run for one stage, active (fluent API) inside the block; FAILED if the block raises.

    Yields ``(run_id, sink)``; ``sink(metrics, step)`` logs step metrics to it.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=stage,
        tags={**tags, "mlflow.parentRunId": parent_run_id, "rlhf.stage": stage},
    )
    run_id = run.info.run_id
    _log_params(client, run_id, params)
    sink = MetricSink(run_id)
    status = "FAILED"
    mlflow.start_run(run_id=run_id)
    try:
        yield run_id, sink
        status = "FINISHED"
    finally:
        sink.flush()
        mlflow.end_run(status=status)


@contextlib.contextmanager
def reopen(run_id: str) -> Iterator[None]:
    """Make a finished run active again to add artifacts, then close it as it was."""
    import mlflow

    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run()
