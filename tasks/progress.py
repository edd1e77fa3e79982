"""Progress of long loops: a live bar on a terminal, a line every few seconds in logs."""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def progress(description: str, total: int | None, every_s: float = 10.0):
    """A progress display (steps done / total, elapsed, ETA, latest figures) for a long loop.

    On a terminal it is a live rich progress bar; otherwise (logs, CI, Prefect workers) one line is printed at most
    every ``every_s`` seconds and at the end. Yields ``advance(n=1, **figures)``; figures (loss, reward...) are shown
    beside the count. Only worker 0 of a distributed run shows it.
    """
    from rich.console import Console

    from rlhf_pipeline.models.distributed import world

    if not world().is_main:
        yield lambda n=1, **figures: None
        return

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

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
