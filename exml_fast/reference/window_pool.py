"""Reference window pooling: PyTorch's own ``F.max_pool2d`` / ``F.avg_pool2d`` with stride = kernel.

The test oracle and benchmark baseline of `exml_fast.ops.window_pool`, and its fallback when the
compiled library is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("max", "avg")


def window_pool(x: torch.Tensor, kernel_size: tuple[int, int], mode: str) -> torch.Tensor:
    """Max or mean over the non-overlapping ``kernel_size`` windows of ``x`` (N, C, H, W); floor mode."""
    if mode == "max":
        return F.max_pool2d(x, kernel_size, stride=kernel_size)
    return F.avg_pool2d(x, kernel_size, stride=kernel_size)
