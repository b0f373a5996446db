"""The dtypes every op accepts and the one it accumulates in."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "acc_dtype"]

#: The floating dtypes every op accepts (computed in fp32, or fp64 for fp64 input).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and statistics, loss) dtype for input of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
