"""torch.distributed, as exml_fast uses it: the default process group's rank and size, and the
few collectives a sharded job needs (an object from rank 0, every rank's objects, a sum, a barrier),
and which rows of a minibatch a rank takes.

Nothing here starts a process or picks an address: ``torchrun`` (or the caller's own
``torch.distributed.init_process_group``) does that. :func:`init_from_env` only joins the group
``torchrun`` describes in the environment, for the command line.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_object", "all_reduce_sum", "barrier", "broadcast_", "broadcast_object", "init_from_env",
           "is_sharded", "rank_and_world", "resolve_world", "shard_rows"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects; NCCL needs the current CUDA
    device set, as torchrun's scripts do with ``torch.cuda.set_device(LOCAL_RANK)``)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def _work_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` where the backend's collectives run: the current CUDA device for NCCL, the CPU
    for gloo."""
    return tensor.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, returned on ``tensor``'s device (``tensor`` itself is left as
    it was)."""
    work = _work_copy(tensor)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrites ``tensor`` with rank ``src``'s, on every rank; returns it."""
    work = _work_copy(tensor)
    dist.broadcast(work, src=src)
    return tensor.copy_(work.to(tensor.device))


def barrier() -> None:
    dist.barrier()


def resolve_world(distributed: bool | None, owner: str) -> tuple[int, int]:
    """(rank, world size) a job of ``owner``'s runs over: ``distributed`` None, the default process group
    when one of more than one rank is initialised (else (0, 1)); False, (0, 1) always; True, the group,
    which must be initialised."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"{owner}: distributed must be None, True or False; got {distributed!r}")
    if distributed is False:
        return 0, 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{owner}: distributed=True needs an initialised torch.distributed process group "
                         "(run under torchrun, or call init_process_group first)")
    return rank_and_world()


def is_sharded(distributed: bool | None = None) -> bool:
    """Whether work is split over more than one rank (:func:`resolve_world`)."""
    return resolve_world(distributed, "exml_fast")[1] > 1


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of ``n`` rows split over ``world`` ranks (sizes differ by
    at most one; a rank gets no row when ``n < world``)."""
    return n * rank // world, n * (rank + 1) // world


def init_from_env(device: torch.device, *, timeout_s: float | None = None) -> bool:
    """Joins the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment),
    unless one is initialised already: gloo for a CPU ``device``, NCCL for CUDA (after setting the
    current device to ``device``). Returns True when it initialised the group (the caller then
    destroys it with ``torch.distributed.destroy_process_group()``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 (torchrun?) but this torch has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {} if timeout_s is None else {"timeout": dt.timedelta(seconds=timeout_s)}
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
    return True
