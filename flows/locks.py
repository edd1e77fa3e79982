"""Serialising work that must not interleave: preparing a data version (a file lock beside the prepared data),
promotions (a file lock in the project and, with a shared Prefect server, the global concurrency limit
``rlhf-promotion``) and training stages on one GPU (the limit ``gpu``).

The file lock serialises processes on one machine, each of which may run its own temporary Prefect server; a global
concurrency limit on a shared server serialises workers on several machines.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

CONCURRENCY_LIMIT = "rlhf-promotion"
DATA_LOCK_FILE = ".prepare.lock"
#: set for a child process (``dvc repro`` -> ``rlhf prepare``) while this process holds the data lock of that path
DATA_LOCK_HELD = "RLHF_DATA_LOCK_HELD"
GPU_LIMIT = "gpu"
LOCK_FILE = ".rlhf-promotion.lock"


def ensure_concurrency_limit(name: str = CONCURRENCY_LIMIT, limit: int = 1) -> None:
    """Create the Prefect global concurrency limit ``name`` when the server has none of that name."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except Exception:  # created concurrently by another promotion
                client.read_global_concurrency_limit_by_name(name)


@contextlib.contextmanager
def promotion_lock(project_dir: str | Path, timeout_s: float = 3600) -> Iterator[None]:
    """Hold the project's promotion file lock and, when ``PREFECT_API_URL`` names a shared Prefect server, a slot of
    its global concurrency limit ``rlhf-promotion`` (limit 1).

    Raises:
        TimeoutError: when another promotion holds them for more than ``timeout_s`` seconds.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(project_dir) / LOCK_FILE))
    if os.environ.get("PREFECT_API_URL"):  # a shared Prefect server: workers on other machines see the limit
        from prefect.concurrency.sync import concurrency

        ensure_concurrency_limit()
        slot = concurrency(CONCURRENCY_LIMIT, occupy=1, timeout_seconds=timeout_s, strict=True)
    else:  # a temporary server lives in one process only: the file lock is what serialises local runs
        slot = contextlib.nullcontext()
    with slot:
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout as exc:
            raise TimeoutError(f"another promotion holds {lock.lock_file} for more than {timeout_s:.0f} s") from exc
        try:
            yield
        finally:
            lock.release()


def data_lock_path(prepared_dir: str | Path) -> Path:
    """The data lock of a prepared folder: ``<parent>/.prepare.lock`` (``data/.prepare.lock``)."""
    return Path(prepared_dir).resolve().parent / DATA_LOCK_FILE


@contextlib.contextmanager
def data_lock(prepared_dir: str | Path, timeout_s: float = 3600,
              on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the data lock of ``prepared_dir`` for preparing and publishing a data version: a second prepare (another
    ``rlhf run``, ``rlhf retrain`` or ``rlhf prepare`` on this machine) waits for the first instead of failing, and
    never sees a half-published version. A child process started under the lock (``dvc repro prepare`` running
    ``rlhf prepare``) sees ``RLHF_DATA_LOCK_HELD`` and does not wait for its parent.

    Args:
        on_wait: called once with a message when the lock is busy and this call starts waiting.

    Raises:
        TimeoutError: another prepare held it for more than ``timeout_s`` seconds.
    """
    from filelock import FileLock, Timeout

    path = data_lock_path(prepared_dir)
    if os.environ.get(DATA_LOCK_HELD) == str(path):  # our parent holds it for us
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(f"another prepare of {Path(prepared_dir)} is running (lock {path}); waiting for it to finish")
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout as exc:
            raise TimeoutError(f"another prepare held {path} for more than {timeout_s:.0f} s") from exc
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def gpu_slot(device: str) -> Iterator[None]:
    """Hold a slot of the Prefect global concurrency limit ``gpu`` while a stage trains on CUDA (two training stages
    never share one GPU when workers share a Prefect server; no limit of that name, no wait).

    Args:
        device: the ``model.device`` setting (``auto``, ``cpu`` or ``cuda``).
    """
    from rlhf_pipeline.models.loading import resolve_device

    if resolve_device(device).type != "cuda":
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        yield
