"""Data-parallel, sharded training on ``torch.distributed``: the same code in one process, on CPU/gloo workers and on
CUDA/NCCL workers.

A stage never starts processes: the orchestration (Ray Train, or ``torchrun``) starts the workers and initialises the
process group, and the stage asks :func:`world` where it runs. In one process without a process group every helper
here is the identity, so single-process training is the case ``world.size == 1`` of the same code.

The method (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP", §3-4):

- :func:`wrap` shards each decoder layer and then the root: parameters, gradients and optimizer states are split over
  the workers (each holds ``1/N``); a layer's parameters are all-gathered for its forward and backward and freed after;
  gradients are reduce-scattered (averaged). ``shard=False`` replicates instead (a ``(N, 1)`` device mesh: every worker
  holds whole parameters, gradients are all-reduced), for models that fit on each worker.
- Mixed precision across workers: fp32 master parameters, fp32 gradient reduction, bf16 compute
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); in one process, autocast
  (:mod:`rlhf_pipeline.models.precision`).
- Batch sizes in the configuration are global: each worker takes its rows (:func:`local_rows`), statistics over a
  batch are computed on the gathered batch (:func:`gather_objects`) or reduced (:func:`all_reduce`), and a loss is a sum
  over the worker's tokens divided by the *global* token count, times N (FSDP averages gradients over the N workers):
  then N workers take the step one process takes on the same global batch.
- Generation: :func:`gathered` unshards a model once for a whole ``generate`` call (one all-gather per layer instead of
  one per layer per generated token). It costs the full parameters in the compute dtype on every worker while it
  samples (for an 8B model in bf16, 16 GB), on top of the worker's shards.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from rlhf_pipeline.models.precision import autocast, compute_dtype

#: set to ``0`` by the orchestration (``distributed.shard: false``) to replicate models instead of sharding them
SHARD_ENV = "RLHF_FSDP_SHARD"


@dataclass(frozen=True)
class World:
    """Where this process runs: ``rank`` of ``size`` workers, ``local_rank`` on its node, and its ``device``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that writes files and logs metrics."""
        return self.rank == 0

    def rows(self, n: int, what: str = "batch") -> slice:
        """This worker's contiguous share of ``n`` global rows.

        Raises:
            ValueError: when ``n`` is not a multiple of the number of workers (the message names ``what``).
        """
        if n % self.size:
            raise ValueError(f"{what} ({n}) must be a multiple of the number of workers ({self.size})")
        share = n // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def world(device: torch.device | str = "cpu") -> World:
    """This process's place: from the initialised process group, else a world of one.

    Args:
        device: the device the stage asked for; with several CUDA workers each uses ``cuda:<local_rank>``.
    """
    device = torch.device(device)
    if not (dist.is_available() and dist.is_initialized()):
        return World(0, 1, 0, device)
    rank, size = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return World(rank, size, local, device)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every worker (nothing in one process)."""
    if _active():
        dist.barrier()


def all_reduce(value: torch.Tensor | float, op: str = "sum") -> torch.Tensor:
    """``value`` summed (``op="sum"``), averaged (``"mean"``) or maximised (``"max"``) over the workers; a float comes
    back as a 0-d float64 tensor on the CPU.

    Raises:
        ValueError: for an unknown ``op``.
    """
    if op not in ("sum", "mean", "max"):
        raise ValueError(f"unknown reduction {op!r}")
    tensor = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor = tensor / dist.get_world_size()
    return tensor


def gather_objects(obj: Any) -> list:
    """Every worker's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def batches(n: int, size: int, here: World) -> list[list[int]]:
    """This worker's share of ``n`` items in global batches of ``size`` consecutive indices: batches ``r, r + N, ...``
    for worker ``r``, padded with empty lists so every worker gets the same number (the forward passes of a sharded
    model are collective: every worker must run as many). An empty batch is a stand-in whose results the caller
    drops. One process gets every batch."""
    everything = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    mine = everything[here.rank :: here.size]
    return mine + [[] for _ in range(-(-len(everything) // here.size) - len(mine))]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model (plain, with a head, or wrapped by peft): the modules whose class
    the model names in ``_no_split_modules`` (``LlamaDecoderLayer``...)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model: torch.nn.Module, world: World, compute_dtype: torch.dtype, shard: bool = True) -> torch.nn.Module:
    """Shard ``model`` over the workers with FSDP2: each decoder layer, then the root (``shard=False``: replicate over
    a ``(N, 1)`` mesh). Parameters stay fp32 (the master copy); ``compute_dtype`` bf16 adds the mixed-precision
    policy (bf16 forward and backward, fp32 gradient reduction). Call after LoRA and before building the optimizer.
    The identity in one process."""
    if world.size == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict = {}
    if compute_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if not shard:
        kwargs["mesh"] = init_device_mesh(world.device.type, (world.size, 1), mesh_dim_names=("replicate", "shard"))
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_wrapped(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`wrap`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Hold ``model``'s full parameters for the block (a whole ``generate`` call): unshard every FSDP module once and
    keep it unsharded across forwards, then free the full parameters. Workers may generate different numbers of
    tokens inside the block (no collective runs there). The identity for a model that is not sharded."""
    if not is_wrapped(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
            # the layers free their parameters after each forward again; the root keeps FSDP's default (it does not)
            module.set_reshard_after_forward(module is not model, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` as CPU tensors on rank 0 (``{}`` on the other workers); every worker must call it."""
    if not is_wrapped(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_tensors(state: dict, path: Path) -> None:
    """Write ``state`` (nested dicts of tensors and DTensors, e.g. ``get_state_dict(model, optimizer)``) as a
    ``torch.distributed.checkpoint`` folder at ``path``; every worker writes its own shards (a checkpoint written by N
    workers loads on any number)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": one process is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(path), no_dist=not _active())


def load_tensors(state: dict, path: Path) -> None:
    """Load a :func:`save_tensors` folder into ``state`` in place, resharded to this number of workers."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not _active())


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only, then wait for it everywhere; returns its result on rank 0, ``None`` elsewhere."""
    result = fn() if world().is_main else None
    barrier()
    return result


@dataclass(frozen=True)
class Engine:
    """How a stage computes: where (:class:`World`), in which dtype, and whether models are sharded or replicated
    across the workers. Stages build one with :meth:`create` and route every model through it.

    Attributes:
        world: this worker's place.
        dtype: the compute dtype (``bfloat16`` or ``float32``); weights and optimizer states are always fp32.
        shard: FSDP2 sharding (``True``) or replication (``False``) when there are several workers.
    """

    world: World
    dtype: torch.dtype
    shard: bool = True

    @classmethod
    def create(cls, device: torch.device | str, precision: str = "fp32") -> "Engine":
        """The engine of this process for ``model.device`` (resolved) and ``model.precision``.

        Raises:
            ValueError: for an unknown precision.
        """
        here = world(device)
        return cls(here, compute_dtype(precision, here.device), os.environ.get(SHARD_ENV, "1") != "0")

    @property
    def device(self) -> torch.device:
        return self.world.device

    def prepare(self, model: torch.nn.Module, checkpointing: bool = False) -> torch.nn.Module:
        """Make ``model`` (fp32, on this device, LoRA already applied) ready to train or infer here: activation
        checkpointing when asked (recompute each layer's activations in the backward pass instead of storing them),
        then sharded or replicated over the workers (:func:`wrap`)."""
        if checkpointing:
            hf = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
            if hf is None:
                raise ValueError(f"{type(model).__name__} has no activation checkpointing")
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return wrap(model, self.world, self.dtype, self.shard)

    def autocast(self):
        """The compute-precision context for forward passes (autocast to the compute dtype; under FSDP2's
        mixed-precision policy the parameters arrive in bf16 already and autocast keeps the numerically sensitive ops
        in fp32, as in one process)."""
        return autocast(self.device, self.dtype)
