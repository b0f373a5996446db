"""Hyperbolic tangent: `tanh`, and `fast_tanh` to use it in a model's ``nn.Tanh`` layers.

LeNet-5 (the Ex-Model CL experts and learner) uses tanh after every layer. On the CPU, PyTorch's ``tanh``
kernel is a scalar loop: about 0.44 G elements/s on a 2-core AVX-512 EPYC, a tenth of its ``sigmoid``'s
rate, and a quarter of a LeNet-5 distillation step (benches/results/exml_profile_cpu.md). The fused CPU
kernel evaluates a branch-free float32 approximation within 2 ulp of tanh that vectorises (AVX2 and
AVX-512 builds; csrc/include/exml_fast/tanh_common.h); the CUDA kernel uses CUDA's ``tanhf``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from exml_fast import _ext
from exml_fast._utils.checks import check_float_dtype, check_tensor
from exml_fast._utils.dtypes import FLOAT_DTYPES
from exml_fast._utils.patching import patched_forwards
from exml_fast.reference.tanh import tanh as _ref_tanh

__all__ = ["fast_tanh", "tanh"]

#: Swap ``nn.Tanh`` layers in :func:`fast_tanh` (tests turn it off to compare).
FAST_TANH = True


def tanh(x: torch.Tensor) -> torch.Tensor:
    """``torch.tanh(x)`` on the fused kernels.

    Args:
        x: any shape; float32, float64, float16 or bfloat16; any strides (a dense layout such as
            channels_last is read and written as it is; other strides are copied once, to the layout
            ``torch.empty_like`` picks).

    Returns:
        tanh(x) in x's dtype and shape, laid out as ``torch.empty_like(x)``. float32 and the 16-bit dtypes (computed in
        float32) are within 2 ulp of the exact tanh on the CPU (PyTorch's own CPU float32 tanh is within
        1); float64 is the C library's tanh. NaN stays NaN, +-inf give +-1, -0 stays -0.
        Differentiable once: the gradient is ``grad * (1 - tanh(x)^2)``, from the output, as PyTorch
        computes it. Double backward raises: use ``exml_fast.reference.tanh`` for it.
    """
    check_tensor(x, "x", "tanh")
    check_float_dtype(x, "x", "tanh")
    if _ext.use_compiled(x):
        return torch.ops.exml_fast.tanh(x)
    return _ref_tanh(x)


def _plan(m: nn.Module) -> bool | None:
    return True if type(m) is nn.Tanh else None  # exactly nn.Tanh: a subclass may override forward


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype in FLOAT_DTYPES and _ext.has_ops():
        return torch.ops.exml_fast.tanh(x)
    return nn.Tanh.forward(self, x)


@contextlib.contextmanager
def fast_tanh(*models: nn.Module) -> Iterator[None]:
    """Within the block, the ``nn.Tanh`` layers (exactly that class) of ``models`` run :func:`tanh` on the CPU.

    At call time a floating CPU input takes the fused op (6-7x PyTorch's eager tanh on one thread; figures in
    benches/results/tanh_cpu.md); anything else takes the layer's own forward: CUDA (the op's kernel has not
    run on a GPU yet), integer input, no compiled library. Values differ from ``torch.tanh`` by at most 2 ulp
    (float32). Double backward through a swapped layer raises. Restored on exit, also after an exception; a
    layer already patched (a nested block) is left to its owner.
    """
    with patched_forwards(models if FAST_TANH else (), _plan, _forward):
        yield


def _register() -> None:
    """Fake kernels and autograd for the compiled ops (only when _C loaded)."""

    @torch.library.register_fake("exml_fast::tanh")
    def _tanh_fake(x):
        return torch.empty_like(x)  # the kernels' layout rule is empty_like's (tanh_host.h)

    @torch.library.register_fake("exml_fast::_tanh_backward")
    def _tanh_backward_fake(grad, y):
        return torch.empty_like(y)

    # The autograd of both ops is registered in C++ (csrc/ops/tanh.cpp): a Python register_autograd cost more
    # per call than the kernel on LeNet-5's small activations.


if _ext.has_ops():
    _register()
