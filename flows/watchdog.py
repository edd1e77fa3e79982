"""Nothing a run started outlives it: a small watchdog process that ends the processes a command started (Prefect's
temporary API server above all, also DVC and ``rlhf prepare`` subprocesses) when that command dies, even by
``SIGKILL``, which runs no ``atexit`` handler and no ``finally`` block.

Prefect starts its temporary server (``python -m uvicorn ...``, used when ``PREFECT_API_URL`` is not set) as a plain
child process and stops it from an ``atexit`` handler; a killed parent leaves it running, holding its port and
database. :func:`start` spawns ``python -m rlhf_pipeline.flows.watchdog <pid> <start time>`` in its own session: it
records the parent's descendants every half second and, once the parent is gone, terminates the recorded ones still
alive (each checked by its start time, so a reused PID is never hit), then exits. A parent that exits normally has
already stopped its server; the watchdog then finds nothing left to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

_started: subprocess.Popen | None = None
POLL_S = 0.5


def start() -> subprocess.Popen | None:
    """Start the watchdog of this process (once per process); ``None`` when ``psutil`` cannot see processes here."""
    global _started
    if _started is not None and _started.poll() is None:
        return _started
    try:
        import psutil

        me = psutil.Process()
        started = me.create_time()
    except Exception:  # no process table to read (exotic platforms): run without a watchdog
        return None
    _started = subprocess.Popen([sys.executable, "-m", "rlhf_pipeline.flows.watchdog", str(me.pid), f"{started:.3f}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    return _started


def watch(pid: int, started: float, poll_s: float = POLL_S) -> list[int]:
    """Record ``pid``'s descendants until it is gone, then end those still alive (SIGTERM, SIGKILL after 5 s).

    Returns:
        the PIDs it ended.
    """
    import psutil

    try:
        parent = psutil.Process(pid)
        if abs(parent.create_time() - started) >= 1.0:
            return []
    except psutil.NoSuchProcess:
        return []
    known: dict[int, psutil.Process] = {}
    me = os.getpid()
    while True:
        try:
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                break
            for child in parent.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        except psutil.AccessDenied:
            pass
        time.sleep(poll_s)
    alive = [p for p in known.values() if p.is_running()]  # is_running also compares the start time
    for process in alive:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=5)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in alive]


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
