"""torch.distributed, as exml_fast uses it: the default process group's rank and size, and the
few collectives a sharded job needs (an object from rank 0, a barrier).

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

__all__ = ["barrier", "broadcast_object", "init_from_env", "rank_and_world"]


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


def barrier() -> None:
    dist.barrier()


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
