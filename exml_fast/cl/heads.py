"""Task heads of multi-task streams: which output units belong to each task label."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["task_head_mask"]


def task_head_mask(classes: Iterable[Sequence[int]], tasks: Iterable[int], num_classes: int) -> torch.Tensor:
    """(T, num_classes) bool: row t marks the units of every experience whose task label is t.

    ``classes`` and ``tasks`` run in parallel, one entry per experience; T = max(tasks) + 1 (rows of unseen
    task labels stay all False).
    """
    classes, tasks = list(classes), [int(t) for t in tasks]
    if len(classes) != len(tasks) or not tasks:
        raise ValueError(f"task_head_mask: classes and tasks must be non-empty and of one length; got "
                         f"{len(classes)} and {len(tasks)}")
    heads = torch.zeros(max(tasks) + 1, num_classes, dtype=torch.bool)
    for cls, t in zip(classes, tasks):
        heads[t, list(cls)] = True
    return heads
