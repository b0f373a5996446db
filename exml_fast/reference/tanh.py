"""Reference tanh: PyTorch's own ``torch.tanh``.

The test oracle and benchmark baseline of `exml_fast.ops.tanh`, and its fallback when the compiled library
is missing.
"""

from __future__ import annotations

import torch


def tanh(x: torch.Tensor) -> torch.Tensor:
    """``torch.tanh(x)``."""
    return torch.tanh(x)
