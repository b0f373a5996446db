"""How ``n`` samples are cut into batches: synthesis jobs and shards (:func:`batch_bounds`) and training passes
(:func:`minibatch_bounds`, which never leaves a last batch of one)."""

from __future__ import annotations

__all__ = ["batch_bounds", "minibatch_bounds"]


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` slices of ``n`` samples in consecutive batches of ``batch_size`` (the last one may
    be smaller)."""
    return [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def minibatch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` slices of one training pass over ``n`` samples in minibatches of ``batch_size``.

    The last minibatch may be smaller, but never a single sample when there is
    more than one minibatch: a last batch of one is folded into the one before
    (which then holds ``batch_size + 1``), because BatchNorm cannot compute
    training statistics from one sample (``Expected more than 1 value per
    channel when training``) and dropping it would silently lose data.
    """
    bounds = batch_bounds(n, batch_size)
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds
