"""Reference image priors of model inversion (DeepInversion's public code)."""

from __future__ import annotations

import torch


def tv_l2(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's l2 total variation of (N, C, H, W) `x`: the sum of the
    Frobenius norms of the differences with four one-pixel shifts (horizontal,
    vertical and both diagonals). Returns a scalar."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()
