"""What every stage shares: its result type, the metric callback, seeding, RNG state and step checkpoints, and
Wilson/bootstrap intervals."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch


class MetricLogger(Protocol):
    """``log(metrics, step)``: called by training loops with grouped metric names (``ppo/kl``, ``sft/loss``...)."""

    def __call__(self, metrics: dict[str, float], step: int) -> None: ...


def no_log(metrics: dict[str, float], step: int) -> None:
    """A :class:`MetricLogger` that drops everything (stages called from tests)."""


@dataclass
class StageResult:
    """What a stage returns: paths of what it wrote and its summary metrics (plain floats / lists).

    Results are small and picklable: Prefect tasks pass them on, never models or tensors (design principle 2).
    """

    stage: str
    paths: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | list | str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU runs with the same seed give the same metrics)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states: torch (CPU and, when present, CUDA), Python's ``random`` and NumPy's."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (a state without ``cuda`` leaves the CUDA generators alone)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_step_checkpoint(root: Path, step: int, write: Callable[[Path], None], state: dict, keep: int) -> Path:
    """Write ``root/step-NNNNNN`` atomically: ``write(folder)`` saves the weights into a temporary folder, ``state``
    goes to ``state.pt``, and the folder is renamed when complete (a kill leaves only a ``.tmp-*`` folder, which
    :func:`latest_step_checkpoint` removes). Only the newest ``keep`` checkpoints are kept. Returns the folder."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    write(tmp)
    torch.save(state, tmp / "state.pt")
    final = root / f"step-{step:06d}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_step_checkpoint(
    root: Path, config_hash: str, required: tuple[str, ...] = ("state.pt",)
) -> tuple[Path, dict] | None:
    """The newest ``root/step-*`` holding every file in ``required`` whose ``state.pt`` was written under
    ``config_hash``, with that state loaded; ``None`` if there is none. Temporary folders of a write cut short by a
    kill are removed first."""
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for candidate in sorted(root.glob("step-*"), reverse=True):
        if all((candidate / name).exists() for name in required):
            state = torch.load(candidate / "state.pt", weights_only=False)
            if state.get("config_hash") == config_hash:
                return candidate, state
    return None


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``successes / n`` (Wilson 1927); ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@contextlib.contextmanager
def progress(description: str, total: int | None, every_s: float = 10.0):
    """A progress display (steps done / total, elapsed, ETA, latest figures) for a long loop.

    On a terminal it is a live rich progress bar; otherwise (logs, CI, Prefect workers) one line is printed at most
    every ``every_s`` seconds and at the end. Yields ``advance(n=1, **figures)``; figures (loss, reward...) are shown
    beside the count.
    """
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)

    def fmt(figures: dict) -> str:
        return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())

    if not console.is_terminal:
        start = last = time.time()
        state = {"done": 0, "figures": {}}

        def advance_lines(n: int = 1, **figures: float) -> None:
            nonlocal last
            state["done"] += n
            state["figures"] = figures or state["figures"]
            now = time.time()
            if now - last >= every_s or (total is not None and state["done"] >= total):
                last = now
                elapsed = now - start
                eta = elapsed / state["done"] * (total - state["done"]) if total and state["done"] else 0.0
                console.print(f"{description}: {state['done']}/{total} elapsed {elapsed:.0f}s ETA {eta:.0f}s "
                              f"{fmt(state['figures'])}", highlight=False)

        yield advance_lines
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **figures: float) -> None:
            bar.update(task, advance=n, info=fmt(figures))

        yield advance


def batched(items: list, size: int) -> list[list]:
    """Consecutive chunks of ``items`` of at most ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]

