"""A local Label Studio server for the labelers (``make label-studio``, ``python -m rlhf_pipeline.infra.label_studio
start|stop|status|setup``).

Label Studio runs in its **own virtual environment**: it cannot share one with Prefect 3.9 (``python-json-logger``,
``redis`` and ``pytz`` pins conflict). Two things are built once per machine and cached under
``$RLHF_CACHE_DIR`` (default ``~/.cache/rlhf-pipeline``) ``/label-studio-<version>/``, so a fresh clone or a CI run
does not pay for them again: ``venv/`` (``pip install label-studio==<version>``, ~1.5 min, ~1 GB) and ``template/``
(a data directory after ``label-studio init``: the ~110 database migrations, 1-3 min on 2 cores, and **no user**).
A project's data directory (default ``<project>/.label-studio/``) starts as a copy of the template; a start on it then
takes a few seconds.

The server:

- listens on 127.0.0.1 only (``--internal-host``; Label Studio's default is 0.0.0.0) and refuses to start when the
  port is taken (Label Studio would silently move to the next free port);
- sends nothing anywhere: ``SENTRY_DSN`` and ``FRONTEND_SENTRY_DSN`` empty (their defaults are real endpoints),
  ``COLLECT_ANALYTICS=false``, ``LATEST_VERSION_CHECK=false``, ``CONVERTER_DOWNLOAD_RESOURCES=false``,
  ``FEATURE_FLAGS_OFFLINE=true``;
- runs with a controlled environment (Label Studio reads plain ``USERNAME``, ``PASSWORD``, ``PORT``, ``HOST``,
  ``DEBUG`` of the shell too) and its own ``SECRET_KEY`` (hex, kept in the data directory: Label Studio's own key
  generation breaks every session on restart when the key starts with ``$``);
- allows sign-up only through the organisation's invite link (``LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK``).

The first start of a data directory creates the admin user and organisation (legacy API tokens on) from the
environment: ``LABEL_STUDIO_USERNAME`` (default ``admin@localhost``), ``LABEL_STUDIO_PASSWORD`` (the web login) and
``LABEL_STUDIO_API_KEY`` (the API token ``rlhf collect`` / ``rlhf import-rankings`` send; 6-40 characters). Neither
the password nor the token is printed or written anywhere by this module.

The server is Django's threaded development server, as ``label-studio start`` runs it: fine for a few labelers on one
machine, not a public deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

VERSION = "1.23.2"
DEFAULT_PORT = 8080
HOST = "127.0.0.1"
DEFAULT_USERNAME = "admin@localhost"
PID_FILE = "label-studio.pid"
PORT_FILE = "label-studio.port"
LOG_FILE = "label-studio.log"
SECRET_FILE = ".rlhf-secret-key"
BOOTSTRAPPED = ".rlhf-bootstrapped"
VENV_MARKER = ".rlhf-complete"
TEMPLATE_MARKER = ".rlhf-template"
_DB = "label_studio.sqlite3"

#: the settings every start gets: bound locally, no telemetry, no open sign-up, quiet
SETTINGS = {
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "COLLECT_ANALYTICS": "false",
    "LATEST_VERSION_CHECK": "false",
    "CONVERTER_DOWNLOAD_RESOURCES": "false",
    "FEATURE_FLAGS_OFFLINE": "true",
    "DEBUG": "false",
    "LOG_LEVEL": "WARNING",
    "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
}
#: variables of the calling environment a server may see (nothing else leaks in)
_PASS_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
                 "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


class LabelStudioSetupError(RuntimeError):
    """Label Studio could not be installed, initialised, started or stopped; the message says why and what to do."""


def cache_dir() -> Path:
    """``$RLHF_CACHE_DIR`` (default ``~/.cache/rlhf-pipeline``) ``/label-studio-<VERSION>``."""
    root = Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-pipeline")
    return root / f"label-studio-{VERSION}"


def _executable(venv: Path) -> Path:
    return venv / "bin" / "label-studio"


def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def base_env() -> dict[str, str]:
    """The environment a Label Studio process gets: a few variables of this one (``PATH``, ``HOME``, locale, pip's
    index settings) plus :data:`SETTINGS`."""
    env = {k: os.environ[k] for k in _PASS_THROUGH if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(SETTINGS)
    return env


def ensure_venv(root: Path | None = None) -> Path:
    """The cached virtual environment with ``label-studio==VERSION``, built once under a lock; a venv whose build did
    not finish (no completion marker) is removed and built again.

    Raises:
        LabelStudioSetupError: ``pip install`` failed (its last lines).
    """
    root = root or cache_dir()
    venv = root / "venv"
    marker = venv / VENV_MARKER
    if marker.is_file():
        return venv
    with _lock(root / ".venv.lock"):
        if marker.is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        python = getattr(sys, "_base_executable", None) or sys.executable
        _log(f"installing label-studio=={VERSION} into {venv} (once per machine, ~1.5 min)")
        start = time.time()
        for command in ([python, "-m", "venv", str(venv)],
                        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         f"label-studio=={VERSION}"]):
            proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise LabelStudioSetupError(f"`{' '.join(command[-3:])}` failed: {(proc.stderr or proc.stdout)[-2000:]}")
        marker.write_text(f"label-studio {VERSION}\n")
        _log(f"label-studio installed in {time.time() - start:.0f}s")
    return venv


def ensure_template(root: Path | None = None, venv: Path | None = None) -> Path:
    """The cached, migrated data directory without any user (``label-studio init --quiet``), built once under a lock.

    Raises:
        LabelStudioSetupError: ``label-studio init`` failed (the end of its output).
    """
    root = root or cache_dir()
    template = root / "template"
    if (template / TEMPLATE_MARKER).is_file():
        return template
    venv = venv or ensure_venv(root)
    with _lock(root / ".template.lock"):
        if (template / TEMPLATE_MARKER).is_file():
            return template
        staging = root / "template.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        env = {**base_env(), "LABEL_STUDIO_BASE_DATA_DIR": str(staging), "SECRET_KEY": secrets.token_hex(32)}
        _log(f"initialising a Label Studio data template in {template} (database migrations, once per machine)")
        start = time.time()
        proc = subprocess.run([str(_executable(venv)), "init", "--quiet", "--no-browser"], env=env, cwd=staging,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not (staging / _DB).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise LabelStudioSetupError(f"`label-studio init` failed: {(proc.stderr or proc.stdout)[-2000:]}")
        (staging / ".env").unlink(missing_ok=True)
        (staging / TEMPLATE_MARKER).write_text(f"label-studio {VERSION} template, no users\n")
        shutil.rmtree(template, ignore_errors=True)
        os.rename(staging, template)
        _log(f"template ready in {time.time() - start:.0f}s")
    return template


def setup() -> tuple[Path, Path]:
    """Build (or find) the cached venv and template; returns ``(venv, template)``."""
    venv = ensure_venv()
    return venv, ensure_template(venv=venv)


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    """A port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@dataclass
class Server:
    """A running Label Studio: its ``pid`` (leader of its own process group), ``url``, ``data_dir`` and ``log``."""

    pid: int
    url: str
    data_dir: Path
    log: Path


def _secret_key(data_dir: Path) -> str:
    path = data_dir / SECRET_FILE
    if not path.is_file():
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def running(data_dir: Path) -> Server | None:
    """The server started on ``data_dir`` when its PID file names a live process, else ``None``."""
    pid_file, port_file = data_dir / PID_FILE, data_dir / PORT_FILE
    if not pid_file.is_file():
        return None
    pid = int(pid_file.read_text().strip() or 0)
    if pid <= 0 or not _alive(pid):
        return None
    port = int(port_file.read_text().strip()) if port_file.is_file() else DEFAULT_PORT
    return Server(pid, f"http://{HOST}:{port}", data_dir, data_dir / LOG_FILE)


def start(data_dir: Path, port: int = DEFAULT_PORT, timeout_s: float = 600.0, credentials: dict | None = None) -> Server:
    """Start Label Studio on ``HOST:port`` with its data in ``data_dir`` (a copy of the template when new) and wait
    for ``/health``.

    Args:
        data_dir: the data directory (SQLite database, media, exports).
        port: where to listen (refused when taken).
        timeout_s: how long to wait for ``/health``.
        credentials: ``{"username", "password", "api_key"}`` for the first start of ``data_dir``; default from
            ``LABEL_STUDIO_USERNAME`` / ``LABEL_STUDIO_PASSWORD`` / ``LABEL_STUDIO_API_KEY``.

    Returns:
        the :class:`Server` (an already running one on ``data_dir`` is returned as it is).

    Raises:
        LabelStudioSetupError: the port is taken, the first start lacks a password or token, or the server died or
            did not answer in time (the end of its log included).
    """
    data_dir = Path(data_dir).resolve()
    current = running(data_dir)
    if current is not None:
        return current
    if port_in_use(port):
        raise LabelStudioSetupError(f"port {port} on {HOST} is in use; choose another (make label-studio "
                                    "LABEL_STUDIO_PORT=8081, or --port)")
    first = not (data_dir / BOOTSTRAPPED).is_file()
    env = base_env()
    if first:
        given = credentials or {}
        username = given.get("username") or os.environ.get("LABEL_STUDIO_USERNAME") or DEFAULT_USERNAME
        password = given.get("password") or os.environ.get("LABEL_STUDIO_PASSWORD", "")
        api_key = given.get("api_key") or os.environ.get("LABEL_STUDIO_API_KEY", "")
        if not password or not 6 <= len(api_key) <= 40:
            raise LabelStudioSetupError(
                f"the first start of {data_dir} creates the admin user: export LABEL_STUDIO_PASSWORD (your web login) and "
                "LABEL_STUDIO_API_KEY (6-40 characters, the token `rlhf collect` sends), e.g.\n"
                "  export LABEL_STUDIO_API_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(20))')\n"
                f"  export LABEL_STUDIO_PASSWORD=...   (user {username}; LABEL_STUDIO_USERNAME changes it)")
        env.update({"LABEL_STUDIO_USERNAME": username, "LABEL_STUDIO_PASSWORD": password,
                    "LABEL_STUDIO_USER_TOKEN": api_key, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"})
    venv, template = setup()
    if not (data_dir / _DB).is_file():
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(template, data_dir, dirs_exist_ok=True)
        (data_dir / TEMPLATE_MARKER).unlink(missing_ok=True)
    data_dir.chmod(0o700)
    env.update({"LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "SECRET_KEY": _secret_key(data_dir)})
    log = data_dir / LOG_FILE
    started = time.time()
    with open(log, "ab") as handle:
        proc = subprocess.Popen(
            [str(_executable(venv)), "start", "--no-browser", "--internal-host", HOST, "--port", str(port),
             "--data-dir", str(data_dir)],
            env=env, cwd=data_dir, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True)
    (data_dir / PID_FILE).write_text(f"{proc.pid}\n")
    (data_dir / PORT_FILE).write_text(f"{port}\n")
    url = f"http://{HOST}:{port}"
    while not _healthy(url):
        if proc.poll() is not None or time.time() - started > timeout_s:
            why = "exited" if proc.poll() is not None else f"did not answer in {timeout_s:.0f}s"
            stop_pid(proc.pid)
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise LabelStudioSetupError(f"Label Studio {why} (log {log}):\n{tail}")
        time.sleep(0.5)
    if first:
        (data_dir / BOOTSTRAPPED).write_text(f"admin created at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    _log(f"Label Studio {VERSION} on {url} (pid {proc.pid}, ready in {time.time() - started:.1f}s, data {data_dir})")
    return Server(proc.pid, url, data_dir, log)


def stop_pid(pid: int, timeout_s: float = 15.0) -> bool:
    """Stop the process group led by ``pid`` (SIGTERM, then SIGKILL after ``timeout_s``); whether it was running."""
    if not _alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _alive(pid) and time.time() < deadline + 5:
            time.sleep(0.2)
    return True


def stop(data_dir: Path) -> bool:
    """Stop the server started on ``data_dir`` (by the PID in its PID file); whether one was running."""
    data_dir = Path(data_dir).resolve()
    server = running(data_dir)
    (data_dir / PID_FILE).unlink(missing_ok=True)
    return stop_pid(server.pid) if server else False


def main(argv: list[str] | None = None) -> int:
    """``start`` / ``stop`` / ``status`` / ``setup`` (see the module docstring); exit status 0 on success."""
    parser = argparse.ArgumentParser(prog="python -m rlhf_pipeline.infra.label_studio",
                                     description="A local Label Studio for the rankings (own cached venv, 127.0.0.1).")
    parser.add_argument("command", choices=("start", "stop", "status", "setup"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("LABEL_STUDIO_PORT") or DEFAULT_PORT))
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="Label Studio's data (default $LABEL_STUDIO_DATA_DIR, else <project>/.label-studio)")
    parser.add_argument("--project-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    data_dir = (args.data_dir or Path(os.environ.get("LABEL_STUDIO_DATA_DIR") or args.project_dir / ".label-studio"))
    try:
        if args.command == "setup":
            venv, template = setup()
            print(f"label-studio {VERSION}: venv {venv}, template {template}")
        elif args.command == "start":
            server = start(data_dir, args.port)
            print(f"Label Studio runs at {server.url} (pid {server.pid}; log {server.log}; `make label-studio-stop` "
                  "stops it)\nlog in as $LABEL_STUDIO_USERNAME (default admin@localhost) with $LABEL_STUDIO_PASSWORD; "
                  f"rlhf collect --label-studio {server.url} reads the token from $LABEL_STUDIO_API_KEY")
        elif args.command == "stop":
            print("stopped" if stop(data_dir) else "Label Studio was not running")
        else:
            server = running(data_dir.resolve())
            if server is None:
                print("Label Studio is not running")
                return 1
            print(f"Label Studio runs at {server.url} (pid {server.pid}, healthy: {_healthy(server.url)})")
    except LabelStudioSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
