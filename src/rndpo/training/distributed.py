"""``torch.distributed`` helpers: rndpo runs under ``torchrun`` as it is, and alone without it.

Launch (single node, N processes; multi-node with torchrun's own flags)::

    torchrun --nproc_per_node=4 -m rndpo.cli run study.yaml --cell 12
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 -m rndpo.cli run study.yaml --cell 12

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` starts the process group
(NCCL with CUDA, gloo on CPU). Data is sharded per optimizer step (:func:`shard`), gradients are
averaged by :class:`torch.nn.parallel.DistributedDataParallel`, and only rank 0 writes checkpoints,
metrics and reports (:func:`is_main`). With ``WORLD_SIZE`` unset or 1 every helper is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "info", "is_main", "shard", "barrier", "all_reduce_sum", "broadcast_object", "wrap", "unwrap"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    """Rank, world size and local rank of this process; ``(0, 1, 0)`` until :func:`init` has started a
    process group (so library code is single-process unless the caller opted in)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init() -> DistInfo:
    """Start the process group when launched by torchrun with ``WORLD_SIZE > 1`` (idempotent)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and dist.is_available() and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return info()


def is_main() -> bool:
    """True on rank 0 (the only rank that writes files)."""
    return info().rank == 0


def shard(items: np.ndarray, dist_info: DistInfo | None = None) -> np.ndarray:
    """This rank's share of ``items`` (``items[rank::world_size]``): contiguous-free, balanced to ±1."""
    dist_info = dist_info or info()
    return items[dist_info.rank :: dist_info.world_size]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float) -> float:
    """Sum of ``value`` over ranks (the value itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast_object(value):
    """Rank 0's ``value`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    device_ids = [info().local_rank] if torch.cuda.is_available() else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
