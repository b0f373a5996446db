"""Reference nearest 2× upsampling followed by a 3×3 convolution: ``F.interpolate`` then ``F.conv2d``.

The test oracle and benchmark baseline of `exml_fast.ops.upsample_conv`, as SKD's Table IV generator
(and DAFL's) computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
