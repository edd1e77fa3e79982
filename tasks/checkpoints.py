"""Resumable step checkpoints of the training loops, sharded and free of pickle.

A checkpoint is a folder ``step-NNNNNN`` with

- ``state.json``: the loop's position and history (step, data position, KL coefficient, metrics so far...) and the
  hash of the configuration it was written under; read first, and nothing else is read unless the hash matches;
- ``tensors/``: a ``torch.distributed.checkpoint`` folder with the models' weights, the optimizer states and other
  tensors (an EMA shadow). Each worker writes its own shards; any number of workers loads it (DCP reshards), so a run
  saved with 2 workers resumes with 1 and the reverse.

Nothing is unpickled: DCP stores tensors and their metadata, JSON the rest; a planted file runs no code. The folder is
written under a temporary name and renamed by worker 0 once every worker has written (a kill leaves only the
temporary folder, which the next run removes).

The random streams are not saved: every step draws from generators seeded by ``(seed, step, worker)``
(:func:`step_seed`), so a resumed run continues with the streams an uninterrupted run would use (with the same number
of workers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from rlhf_pipeline.models import distributed

STATE = "state.json"
TENSORS = "tensors"


def step_seed(seed: int, step: int, *salt: object) -> int:
    """A 63-bit seed derived from ``seed``, the ``step`` and anything else (a worker's rank, a purpose name)."""
    payload = json.dumps([seed, step, *map(str, salt)]).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") >> 1


def save_step(root: Path, step: int, tensors: dict, state: dict, keep: int) -> Path:
    """Write ``root/step-NNNNNN``: ``tensors`` (nested dicts of tensors / DTensors, e.g. ``get_state_dict(model,
    optimizer)``) with ``torch.distributed.checkpoint`` and ``state`` (JSON-serialisable) as ``state.json``. Every
    worker calls it. Only the newest ``keep`` checkpoints are kept. Returns the folder."""
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    main = distributed.world().is_main
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    distributed.save_tensors(tensors, tmp / TENSORS)
    if main:
        (tmp / STATE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def latest_step(root: Path, config_hash: str) -> tuple[Path, dict] | None:
    """The newest complete ``root/step-*`` written under ``config_hash`` and its ``state.json``; ``None`` if there is
    none. Temporary folders of a write cut short by a kill are removed first (by worker 0)."""
    if distributed.world().is_main:
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    for candidate in sorted(root.glob("step-*"), reverse=True):
        try:
            state = json.loads((candidate / STATE).read_text())
        except (OSError, ValueError):
            continue
        if state.get("config_hash") == config_hash and (candidate / TENSORS / ".metadata").is_file():
            return candidate, state
    return None


def load_step(folder: Path, tensors: dict) -> None:
    """Load the tensors of the checkpoint ``folder`` into ``tensors`` in place (resharded to this number of
    workers)."""
    distributed.load_tensors(tensors, folder / TENSORS)


def training_state(model, optimizer) -> dict:
    """What a checkpoint keeps of a model being trained: its trainable weights and its optimizer state, in the
    model's layout (sharded DTensors under FSDP2). Frozen weights (a LoRA model's base, the lower blocks in
    ``top_layers`` mode, a tied output matrix) are not written: the stage rebuilds them from its inputs.

    Returns:
        ``{"model": {name: tensor}, "optim": optimizer state keyed by parameter name}``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in weights.items() if k in trainable}, "optim": optim}


def restore_training_state(model, optimizer, state: dict) -> None:
    """Load what :func:`training_state` returned (after :func:`load_step` filled it) into ``model`` and
    ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
