"""Shared pieces of the op tests: devices, dtypes, the compiled-ops skip and
tolerances relative to PyTorch's own error in a dtype."""

from __future__ import annotations

import pytest
import torch

import exml_fast

requires_ops = pytest.mark.skipif(not exml_fast.has_ops(), reason="compiled exml_fast._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FLOAT_DTYPES = DTYPES

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ],
)
DEVICES = ["cpu", CUDA]


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
