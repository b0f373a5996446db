"""Swap a model's layers' ``forward`` for the duration of a block, and put everything back after it.

The mechanism behind `exml_fast.ops.fast_pooling`, `exml_fast.ops.fast_tanh` and
`exml_fast.synth.input_grad_conv.input_grad_convs`: each patches, per module instance, the layers it can
run faster, leaving the classes and every other model untouched.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

#: Where a patched module keeps the value its ``plan`` returned (read by the patched forward).
PLAN_KEY = "_exml_plan"


@contextlib.contextmanager
def patched_forwards(models: Iterable[nn.Module | None], plan: Callable[[nn.Module], Any],
                     forward: Callable[..., Any], *, scratch: tuple[str, ...] = ()) -> Iterator[list[nn.Module]]:
    """Within the block, every module ``m`` of ``models`` (None entries skipped) with ``plan(m) is not None``
    runs ``forward(m, *args)``; ``m.__dict__[PLAN_KEY]`` holds ``plan(m)``.

    A module whose ``forward`` is already set on the instance (another block's patch, or the user's) is left
    alone. On exit, also after an exception, the patched modules get their class's ``forward`` back and lose
    ``PLAN_KEY`` and the ``scratch`` keys (caches the patched forward kept in ``m.__dict__``). Yields the
    patched modules.
    """
    patched = []
    for model in models:
        if model is None:
            continue
        for m in model.modules():
            if "forward" in m.__dict__:
                continue
            value = plan(m)
            if value is not None:
                m.__dict__[PLAN_KEY] = value
                m.forward = types.MethodType(forward, m)
                patched.append(m)
    try:
        yield patched
    finally:
        for m in patched:
            del m.forward
            for key in (PLAN_KEY, *scratch):
                m.__dict__.pop(key, None)
