"""MLflow tracking for a flow run: one parent run, one nested run per stage, step metrics as they happen.

The runs are created through ``MlflowClient`` with explicit ``mlflow.parentRunId`` tags rather than the fluent run
stack, so nesting holds whichever thread a Prefect task runs on.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Iterator

from rlhf_pipeline.tasks.stage import numeric_metrics

_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret|api_?key|access_?key|secret_?key|sig|signature|"
                           r"auth)=)[^&#\s]*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/@\s:]*)(:[^/\s]*)?@")


def redact_uri(uri: str) -> str:
    """A URI fit to show or store: the password of its user-info replaced by ``***`` (``http://alice:***@host``), a
    user-info without a password (it may be a token) replaced entirely (``https://***@host``), and the values of
    secret-looking query parameters (``password``, ``token``, ``key``...) likewise."""
    return redact_text(uri)


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URI in it redacted (see :func:`redact_uri`): for messages and errors."""
    def userinfo(match: re.Match) -> str:
        scheme, user, password = match.groups()
        return f"{scheme}{user}:***@" if password is not None else f"{scheme}***@"

    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(userinfo, str(text)))


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be used (unreachable server, refused credentials, missing folder). The message
    is one line naming the URI without its credentials."""


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any work, when the tracking store cannot be used: an ``http(s)`` server must answer an MLflow
    API call within ``timeout_s`` (no retries) and accept the credentials (from the URI or ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``); a ``sqlite`` file's folder must exist; a
    ``postgresql`` server must accept a connection within ``timeout_s``.

    Raises:
        TrackingUnavailable: one line naming the URI (credentials redacted) and the reason.
    """
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    shown = redact_uri(uri)
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
        user = urllib.parse.unquote(parts.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = urllib.parse.unquote(parts.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise TrackingUnavailable(f"MLflow tracking server {shown} refused the credentials (HTTP {exc.code}); "
                                          "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
            raise TrackingUnavailable(f"{shown} does not answer like an MLflow tracking server (HTTP {exc.code} "
                                      "from its REST API)") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(f"MLflow tracking server {shown} is unreachable ({redact_text(reason)}; waited "
                                      f"at most {timeout_s:.0f} s); start it or set MLFLOW_TRACKING_URI") from None
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[-1] if ":///" in uri else ""
        folder = Path(path).parent if path and path != ":memory:" else None
        if folder is not None and not folder.is_dir():
            raise TrackingUnavailable(f"the folder of the MLflow store {shown} does not exist ({folder})")
    elif scheme.startswith(("postgresql", "mysql")):
        import sqlalchemy

        args = {"connect_timeout": int(max(1, timeout_s))}
        try:
            engine = sqlalchemy.create_engine(uri, connect_args=args)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:
            raise TrackingUnavailable(f"MLflow tracking database {shown} is unreachable: "
                                      f"{redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None


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
    check_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (Path(project_dir).resolve() / "mlartifacts").as_uri()
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # created by a concurrent run
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = found.experiment_id
    close_stale_runs(experiment_id)
    return experiment_id


def process_tags() -> dict[str, str]:
    """Tags that say which process owns a pipeline run (host, PID and the PID's start time), so a later run can tell
    a run whose process died from one still running (:func:`close_stale_runs`)."""
    import socket

    import psutil

    me = psutil.Process()
    return {"rlhf.host": socket.gethostname(), "rlhf.pid": str(me.pid), "rlhf.pid_started": f"{me.create_time():.3f}"}


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0  # the same process, not a reused PID
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def close_stale_runs(experiment_id: str) -> list[str]:
    """Mark ``KILLED`` the pipeline runs of this host left ``RUNNING`` by a process that no longer exists (killed by a
    signal, the OOM killer, a power cut), with their stage runs; runs of live processes and of other hosts are left
    alone. Called by :func:`setup_mlflow`, so the next run of the project (or any ``rlhf`` command using its store)
    cleans up.

    Returns:
        the ids of the runs it closed.
    """
    import socket

    from mlflow import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    closed = []
    parents = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING' and "
                                 "tags.`rlhf.kind` = 'pipeline'", max_results=500)
    for parent in parents:
        tags = parent.data.tags
        if tags.get("rlhf.host") != host or not tags.get("rlhf.pid"):
            continue
        try:
            if _process_alive(int(tags["rlhf.pid"]), float(tags.get("rlhf.pid_started", "0"))):
                continue
        except ValueError:
            continue
        children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = "
                                      f"'{parent.info.run_id}' and attributes.status = 'RUNNING'", max_results=500)
        note = (f"Closed as KILLED by a later run: process {tags['rlhf.pid']} on {host} ended without closing this "
                "run (killed?).")
        for run in [*children, parent]:
            client.set_tag(run.info.run_id, "rlhf.closed_stale", note)
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


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
    tracking_uri = redact_uri(tracking_uri)  # stored in the Prefect database: never a password
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
