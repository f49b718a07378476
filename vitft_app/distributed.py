"""Data-parallel training across processes with PyTorch's DistributedDataParallel.

The same engine runs under ``torchrun`` or ``accelerate launch`` (both set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``): :func:`init_distributed`
joins the process group (NCCL on CUDA, gloo on CPU), every process trains on its share of each
batch, DDP averages the gradients, and only the main process (rank 0) writes the run folder.
Without those variables everything here is a no-op and training is single-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run.

    Attributes:
        rank: global rank (0 = main process).
        world_size: number of processes (1 = not distributed).
        local_rank: rank on this machine (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that emits events and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Waits for every process."""
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (in place, also returned)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is True in any process (Stop, a non-finite loss)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(timeout_s: float = 1800) -> DistContext:
    """Joins the process group when launched by ``torchrun`` / ``accelerate launch``.

    Backend: NCCL when CUDA is available (each process takes GPU ``LOCAL_RANK``), else gloo.

    Returns:
        The :class:`DistContext` (``world_size`` 1 when not launched distributed).
    """
    world = env_world_size()
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)


def current_context() -> DistContext:
    """The context of an already initialized process group (single-process when none)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def process_device(ctx: DistContext, device: str | None) -> str | None:
    """The device of this process: ``cuda:LOCAL_RANK`` in a distributed CUDA run, else ``device``."""
    if ctx.enabled and device is None and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return device


def shard_micro_batch(order: list[int], micro: int, batch_size: int, ctx: DistContext) -> list[int]:
    """This process's share of global micro-batch ``micro``.

    The global micro-batch is ``batch_size x world_size`` consecutive samples of the epoch's
    order (the batch a single process with that batch size would take); process ``r`` takes the
    ``r``-th block of ``batch_size``. Together the processes see exactly the samples, and with
    summed gradients exactly the gradient, of the single-process run with the larger batch.
    """
    global_batch = batch_size * ctx.world_size
    start = micro * global_batch + ctx.rank * batch_size
    return order[start : start + batch_size]
