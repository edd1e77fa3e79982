"""Resumable step checkpoints of the training loops: atomic ``step-NNNNNN`` folders and the RNG state they carry."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


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
