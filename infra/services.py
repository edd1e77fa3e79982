#!/usr/bin/env python
"""A real Prefect server and a real MLflow server on this machine, without Docker (``make services``).

    python -m rlhf_pipeline.infra.services start  [--prefect-port 4200] [--mlflow-port 5000] [--postgres auto|yes|no]
    python -m rlhf_pipeline.infra.services status
    python -m rlhf_pipeline.infra.services stop
    python -m rlhf_pipeline.infra.services setup  [--api-url URL]     # work pools + the `gpu` concurrency limit, idempotent

Both servers are backed by PostgreSQL when one answers at ``$RLHF_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth): the databases ``rlhf_prefect`` (with the ``pg_trgm``
extension the Prefect server needs) and ``rlhf_mlflow`` are created when missing. Otherwise they use SQLite files
(``.services/prefect.db``, the project's ``mlflow.db``). MLflow serves artifacts from ``<project>/mlartifacts``.
PIDs, logs and the chosen URLs are kept in ``.services/``; each server runs in its own process group, which ``stop``
ends. ``start`` waits until both answer their health checks, creates the work pools of ``infra/prefect.yaml`` and the
global concurrency limit ``gpu`` (limit 1), and prints the ``export`` line for ``PREFECT_API_URL`` and
``MLFLOW_TRACKING_URI``.

The functions below are what ``tests/integration/test_real_servers.py`` uses with its own ports, folders and databases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_pipeline.flows.locks import GPU_LIMIT as GPU_LIMIT_NAME

INFRA_DIR = Path(__file__).resolve().parent  # the templates beside this file (package data when installed)
PROJECT_ROOT = Path.cwd()  # the project the servers serve: `make services` runs from the repository root
STATE_DIR = PROJECT_ROOT / ".services"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PREFECT_DB = "rlhf_prefect"
MLFLOW_DB = "rlhf_mlflow"
PREFECT_EXTENSIONS = ("pg_trgm",)  # Prefect's migrations create it; it must be installed on the server (contrib)
# the work pools of infra/prefect.yaml: name -> (type, base job template file or None for the worker's default)
WORK_POOLS: dict[str, tuple[str, Path | None]] = {
    "rlhf-process": ("process", None),
    "rlhf-docker": ("docker", INFRA_DIR / "docker-base-job-template.json"),
    "rlhf-kubernetes": ("kubernetes", INFRA_DIR / "k8s-base-job-template.json"),
}
GPU_LIMIT = (GPU_LIMIT_NAME, 1)  # the global concurrency limit the training stages hold: one stage per GPU


class ServiceError(RuntimeError):
    """A server did not start, a database could not be prepared, or a port is taken."""


# ---------------------------------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------------------------------

def postgres_url() -> str:
    return os.environ.get("RLHF_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def database_url(admin_url: str, database: str, driver: str | None = None) -> str:
    """``admin_url`` pointed at ``database``; ``driver`` (``asyncpg``, ``psycopg2``) goes into the scheme."""
    from sqlalchemy.engine import make_url

    url = make_url(admin_url).set(database=database)
    if driver:
        url = url.set(drivername=f"postgresql+{driver}")
    return url.render_as_string(hide_password=False)


def _pg_connect(url: str):
    """An autocommit psycopg2 connection (``url`` in libpq form: postgresql://user[:password]@host:port/db)."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True
    return conn


def postgres_reachable(admin_url: str | None = None) -> tuple[bool, str]:
    """(True, version) when PostgreSQL answers at ``admin_url``, else (False, why)."""
    admin_url = admin_url or postgres_url()
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return False, "psycopg2 is not installed (pip install psycopg2-binary)"
    try:
        conn = _pg_connect(admin_url)
    except Exception as exc:  # psycopg2.OperationalError and friends
        first_line = (str(exc).strip().splitlines() or [repr(exc)])[0]
        return False, f"{type(exc).__name__}: {first_line}"
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return True, f"PostgreSQL {cur.fetchone()[0]}"
    finally:
        conn.close()


def ensure_database(name: str, admin_url: str | None = None, extensions: tuple[str, ...] = ()) -> str:
    """Create database ``name`` if missing and the ``extensions`` in it; returns its URL (no driver)."""
    from psycopg2 import sql

    admin_url = admin_url or postgres_url()
    conn = _pg_connect(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    url = database_url(admin_url, name)
    if extensions:
        conn = _pg_connect(url)
        try:
            with conn.cursor() as cur:
                for extension in extensions:
                    cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", (extension,))
                    if cur.fetchone() is None:
                        raise ServiceError(
                            f"PostgreSQL lacks the {extension} extension the Prefect server needs "
                            "(Debian/Ubuntu: apt-get install postgresql-contrib)"
                        )
                    cur.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension)))
        finally:
            conn.close()
    return url


def drop_database(name: str, admin_url: str | None = None) -> None:
    """Drop database ``name`` (closing its connections first) if it exists."""
    from psycopg2 import sql

    conn = _pg_connect(admin_url or postgres_url())
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()


@dataclass
class Backends:
    """Where each server keeps its state."""

    kind: str  # "postgresql" or "sqlite"
    prefect_database_url: str  # PREFECT_SERVER_DATABASE_CONNECTION_URL (async driver)
    mlflow_backend_store_uri: str  # mlflow server --backend-store-uri

    def describe(self) -> str:
        return f"{self.kind}: Prefect {_redact(self.prefect_database_url)}, MLflow {_redact(self.mlflow_backend_store_uri)}"


def _redact(url: str) -> str:
    if url.startswith("postgresql") and "://" in url:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def choose_backends(
    project_dir: Path = PROJECT_ROOT,
    state_dir: Path = STATE_DIR,
    postgres: str = "auto",
    admin_url: str | None = None,
    prefect_db: str = PREFECT_DB,
    mlflow_db: str = MLFLOW_DB,
    log: Callable[[str], None] = print,
) -> Backends:
    """PostgreSQL databases (created if missing) when ``postgres`` is ``yes``, or ``auto`` and one answers; SQLite
    files otherwise."""
    admin_url = admin_url or postgres_url()
    if postgres not in ("auto", "yes", "no"):
        raise ValueError(f"postgres must be auto, yes or no, not {postgres!r}")
    if postgres != "no":
        ok, why = postgres_reachable(admin_url)
        if ok:
            ensure_database(prefect_db, admin_url, extensions=PREFECT_EXTENSIONS)
            ensure_database(mlflow_db, admin_url)
            log(f"{why} at {_redact(admin_url)}: databases {prefect_db}, {mlflow_db}")
            return Backends(
                "postgresql",
                database_url(admin_url, prefect_db, "asyncpg"),
                database_url(admin_url, mlflow_db, "psycopg2"),
            )
        if postgres == "yes":
            raise ServiceError(f"no PostgreSQL at {_redact(admin_url)}: {why}")
        log(f"no PostgreSQL at {_redact(admin_url)} ({why}): using SQLite")
    state_dir.mkdir(parents=True, exist_ok=True)
    return Backends(
        "sqlite",
        f"sqlite+aiosqlite:///{(state_dir / 'prefect.db').resolve()}",
        f"sqlite:///{(project_dir / 'mlflow.db').resolve()}",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------------

def executable(name: str) -> str:
    """``name`` beside this Python (the project's virtual environment), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found next to {sys.executable} nor on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _quiet_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        # a new session: the server and the workers it forks form one process group that stop_process_group ends
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)


def start_prefect_server(
    port: int,
    database_url: str,
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    prefect_home: Path | None = None,
    cwd: Path = PROJECT_ROOT,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``prefect server start`` in the background; returns at once (see :func:`wait_until_healthy`)."""
    env = _quiet_env({"PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url, **(extra_env or {})})
    env.pop("PREFECT_API_URL", None)  # the server's own settings only
    if prefect_home is not None:
        prefect_home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(prefect_home)
    cmd = [executable("prefect"), "server", "start", "--host", host, "--port", str(port)]
    return _spawn(cmd, log_path, env, cwd)


def start_mlflow_server(
    port: int,
    backend_store_uri: str,
    artifacts_destination: str | Path,
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    workers: int = 1,
    cwd: Path = PROJECT_ROOT,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``mlflow server`` (tracking, registry and proxied artifacts) in the background; returns at once.

    MLflow 3's security middleware accepts Host headers of localhost and private addresses by default, which is what a
    loopback server needs; expose it further with ``--allowed-hosts`` (see infra/docker-compose.yaml). The server's job
    runner (huey consumers for GenAI scorers, ~7 processes) is off unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set:
    this pipeline does not use it and it costs ~1.5 GB of memory.
    """
    if not str(artifacts_destination).startswith(("s3://", "gs://", "wasbs://", "file:")):
        Path(artifacts_destination).mkdir(parents=True, exist_ok=True)
    cmd = [
        executable("mlflow"), "server",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts_destination),
    ]
    env = _quiet_env(extra_env)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return _spawn(cmd, log_path, env, cwd)


def start_worker(
    pool: str,
    log_path: Path,
    *,
    pool_type: str = "process",
    name: str | None = None,
    cwd: Path = PROJECT_ROOT,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``prefect worker start --pool POOL`` in the background (its flow runs are its subprocesses, in its process
    group); ``extra_env`` must hold ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` unless the environment does."""
    cmd = [executable("prefect"), "worker", "start", "--pool", pool, "--type", pool_type]
    if name:
        cmd += ["--name", name]
    return _spawn(cmd, log_path, _quiet_env(extra_env), cwd)


def prefect_api_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/api"


def mlflow_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}"


def is_healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until_healthy(
    checks: dict[str, tuple[str, subprocess.Popen | None, Path | None]], timeout: float = 240.0
) -> dict[str, float]:
    """Poll each ``name: (health URL, process, log)`` until it answers 200; returns the seconds each took.

    Raises ServiceError with the log's tail when a process exits or the timeout passes.
    """
    start = time.monotonic()
    pending = dict(checks)
    took: dict[str, float] = {}
    while pending:
        for name, (url, proc, log) in list(pending.items()):
            if is_healthy(url):
                took[name] = time.monotonic() - start
                del pending[name]
            elif proc is not None and proc.poll() is not None:
                raise ServiceError(f"{name} exited with code {proc.returncode}; {log}:\n{log_tail(log) if log else ''}")
        if pending and time.monotonic() - start > timeout:
            name, (url, _, log) = next(iter(pending.items()))
            raise ServiceError(f"{name} did not answer {url} within {timeout:.0f} s; {log}:\n"
                               f"{log_tail(log) if log else ''}")
        if pending:
            time.sleep(1.0)
    return took


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_process_group(target: int | subprocess.Popen, timeout: float = 30.0) -> bool:
    """SIGTERM the process group led by ``target`` (a process started with a new session, as :func:`_spawn` does),
    SIGKILL what is left after ``timeout`` seconds. Returns False when nothing was running."""
    proc = target if isinstance(target, subprocess.Popen) else None
    pgid = proc.pid if proc is not None else int(target)
    if proc is not None:
        proc.poll()  # reap an exited leader so that an empty group reads as empty
    if not _group_alive(pgid):
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _group_alive(pgid):
            return True
        time.sleep(0.3)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait(timeout=10)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Prefect: work pools and the gpu concurrency limit
# ---------------------------------------------------------------------------------------------------------------------

def base_job_template(pool_type: str, template: Path | None) -> dict:
    if template is not None:
        return json.loads(template.read_text())
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    raise ValueError(f"no base job template for work pool type {pool_type!r}")


def setup_prefect(
    api_url: str,
    pools: dict[str, tuple[str, Path | None]] | None = None,
    gpu_limit: tuple[str, int] = GPU_LIMIT,
    log: Callable[[str], None] = print,
) -> None:
    """Create the work pools (kept as they are when they exist) and the global concurrency limit ``gpu`` (its limit set
    to 1 when it exists with another): what ``prefect work-pool create`` and ``prefect gcl create gpu --limit 1`` do,
    but safe to repeat."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pools = WORK_POOLS if pools is None else pools
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            for name, (pool_type, template) in pools.items():
                try:
                    existing = client.read_work_pool(name)
                    log(f"work pool {name} ({existing.type}) exists")
                    continue
                except ObjectNotFound:
                    pass
                try:
                    client.create_work_pool(WorkPoolCreate(
                        name=name, type=pool_type, base_job_template=base_job_template(pool_type, template)))
                    log(f"work pool {name} ({pool_type}) created")
                except ObjectAlreadyExists:
                    log(f"work pool {name} exists")
            name, limit = gpu_limit
            client.upsert_global_concurrency_limit_by_name(name, limit)
            log(f"global concurrency limit {name}: {limit}")


# ---------------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------------

SERVERS = ("prefect", "mlflow")


def _pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.pid"


def _read_pid(state_dir: Path, name: str) -> int | None:
    """The recorded PID when that process is alive and is the server we started."""
    try:
        pid = int(_pid_file(state_dir, name).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return None
        return pid  # no /proc (macOS): trust the pid file
    return pid if name in cmdline and "server" in cmdline else None


def _load_state(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "services.json").read_text())
    except (OSError, ValueError):
        return {}


def _print_exports(state: dict) -> None:
    print(f"Prefect  {state['prefect_ui_url']}   (API {state['prefect_api_url']})")
    print(f"MLflow   {state['mlflow_url']}")
    print(f"Backend  {state['backend']}")
    print(f"Logs     {state['state_dir']}/prefect.log, {state['state_dir']}/mlflow.log")
    print("\nexport PREFECT_API_URL={prefect_api_url} MLFLOW_TRACKING_URI={mlflow_url}".format(**state))


def cmd_start(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    running = {name: _read_pid(state_dir, name) for name in SERVERS}
    state = _load_state(state_dir)
    if all(running.values()) and state:
        print(f"already running (pids {running['prefect']}, {running['mlflow']})")
        _print_exports(state)
        return 0
    if any(running.values()):
        print("one server is running without the other: stopping it first")
        cmd_stop(args)
    for name, port in (("Prefect", args.prefect_port), ("MLflow", args.mlflow_port)):
        if port_in_use(port, args.host):
            raise ServiceError(f"port {port} ({name}) is taken on {args.host}: stop what listens there or pass "
                               f"--{name.lower()}-port")
    backends = choose_backends(PROJECT_ROOT, state_dir, args.postgres, args.postgres_url)
    print(f"starting Prefect on :{args.prefect_port} and MLflow on :{args.mlflow_port} ({backends.kind}) ...")
    logs = {name: state_dir / f"{name}.log" for name in SERVERS}
    procs = {
        "prefect": start_prefect_server(args.prefect_port, backends.prefect_database_url, logs["prefect"],
                                        host=args.host, prefect_home=state_dir / "prefect-home"),
        "mlflow": start_mlflow_server(args.mlflow_port, backends.mlflow_backend_store_uri,
                                      PROJECT_ROOT / "mlartifacts", logs["mlflow"], host=args.host),
    }
    api = prefect_api_url(args.prefect_port, args.host)
    tracking = mlflow_url(args.mlflow_port, args.host)
    state = {
        "prefect_api_url": api,
        "prefect_ui_url": api.removesuffix("/api"),
        "mlflow_url": tracking,
        "backend": backends.describe(),
        "state_dir": str(state_dir),
        "pids": {name: proc.pid for name, proc in procs.items()},
    }
    for name, proc in procs.items():
        _pid_file(state_dir, name).write_text(f"{proc.pid}\n")
    (state_dir / "services.json").write_text(json.dumps(state, indent=2) + "\n")
    try:
        took = wait_until_healthy({
            "prefect": (f"{api}/health", procs["prefect"], logs["prefect"]),
            "mlflow": (f"{tracking}/health", procs["mlflow"], logs["mlflow"]),
        }, timeout=args.timeout)
    except ServiceError:
        for name, proc in procs.items():
            stop_process_group(proc)
            _pid_file(state_dir, name).unlink(missing_ok=True)
        raise
    print(f"healthy: Prefect after {took['prefect']:.0f} s, MLflow after {took['mlflow']:.0f} s")
    if not args.no_setup:
        setup_prefect(api)
    print()
    _print_exports(state)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    for name in SERVERS:
        pid = _read_pid(state_dir, name)
        if pid is None:
            print(f"{name}: not running")
        else:
            stop_process_group(pid)
            print(f"{name}: stopped (pid {pid})")
        _pid_file(state_dir, name).unlink(missing_ok=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    state = _load_state(state_dir)
    ok = True
    for name, url_key, suffix in (("prefect", "prefect_api_url", "/health"), ("mlflow", "mlflow_url", "/health")):
        pid = _read_pid(state_dir, name)
        url = state.get(url_key)
        healthy = bool(pid and url and is_healthy(url + suffix))
        ok &= healthy
        print(f"{name:8s} {'running' if pid else 'stopped':8s} pid {pid or '-':<8} "
              f"{url or '-'} {'healthy' if healthy else 'not answering' if pid else ''}".rstrip())
    if ok:
        print("\nexport PREFECT_API_URL={prefect_api_url} MLFLOW_TRACKING_URI={mlflow_url}".format(**state))
    return 0 if ok else 1


def cmd_setup(args: argparse.Namespace) -> int:
    api = args.api_url or os.environ.get("PREFECT_API_URL") or _load_state(args.state_dir).get("prefect_api_url")
    if not api:
        raise ServiceError("no Prefect API: pass --api-url, set PREFECT_API_URL or run `start` first")
    setup_prefect(api)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_pipeline.infra.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR, help="PIDs, logs, SQLite files (.services)")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start both servers in the background and wait until they answer")
    start.add_argument("--host", default="127.0.0.1")
    start.add_argument("--prefect-port", type=int, default=4200)
    start.add_argument("--mlflow-port", type=int, default=5000)
    start.add_argument("--postgres", choices=("auto", "yes", "no"), default="auto",
                       help="PostgreSQL backend: auto (when one answers), yes (required), no (SQLite)")
    start.add_argument("--postgres-url", default=None, help=f"admin URL (default $RLHF_POSTGRES_URL or {DEFAULT_POSTGRES_URL})")
    start.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the health checks")
    start.add_argument("--no-setup", action="store_true", help="skip creating the work pools and the gpu limit")
    sub.add_parser("stop", help="stop both servers (their process groups)")
    sub.add_parser("status", help="PIDs and health of both servers")
    setup = sub.add_parser("setup", help="create the work pools and the `gpu` concurrency limit (idempotent)")
    setup.add_argument("--api-url", default=None, help="Prefect API URL (default $PREFECT_API_URL)")
    args = parser.parse_args(argv)
    try:
        return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "setup": cmd_setup}[args.command](args)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
