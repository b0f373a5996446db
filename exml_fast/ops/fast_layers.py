"""`fast_layers`: every layer swap of the fused ops at once (`fast_pooling` and `fast_tanh`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from exml_fast.ops.tanh import fast_tanh
from exml_fast.ops.window_pool import fast_pooling

__all__ = ["fast_layers"]


@contextlib.contextmanager
def fast_layers(*models: nn.Module | None) -> Iterator[None]:
    """Within the block, ``models``' eligible pooling layers run `window_pool` (:func:`fast_pooling`) and
    their ``nn.Tanh`` layers run `tanh` (:func:`fast_tanh`) on the CPU; everything else is unchanged.
    Restored on exit, also after an exception. ``None`` entries are skipped.
    """
    with fast_pooling(*models), fast_tanh(*models):
        yield
