"""What every stage shares: its result type, the metric callback, seeding, and Wilson/bootstrap intervals."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

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

