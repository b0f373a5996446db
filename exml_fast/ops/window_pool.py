"""Max and average pooling over non-overlapping windows: `window_pool`, and `fast_pooling` to use it in a model.

LeNet-class networks pool 2 x 2 windows with stride 2. On the CPU, PyTorch's NCHW pooling kernels are
slow for them: a 2 x 2 ``max_pool2d`` of a (256, 6, 28, 28) batch took 5.5 ms (about 0.2 G elements/s)
on a 2-core AVX-512 EPYC, and the max pooling was over a quarter of a LeNet-5-BN DeepInversion step;
``avg_pool2d`` about a fifth of a LeNet-5 distillation step (torch.profiler; benches/bench_window_pool.py
times the op against them). The
fused kernels read each element once in either direction; the max backward recomputes each window's
argmax from the input instead of storing an int64 index per output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from exml_fast import _ext
from exml_fast._utils.checks import check_choice, check_image_batch
from exml_fast._utils.dtypes import FLOAT_DTYPES
from exml_fast._utils.patching import PLAN_KEY, patched_forwards
from exml_fast.reference.window_pool import MODES
from exml_fast.reference.window_pool import window_pool as _ref_window_pool

__all__ = ["fast_pooling", "window_pool"]

#: Swap eligible pooling layers in :func:`fast_pooling` (tests turn it off to compare).
FAST_POOLING = True


def _pair(kernel_size, owner: str) -> tuple[int, int]:
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) and not isinstance(kernel_size, bool) else \
        tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else None
    if ks is None or len(ks) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                             for k in ks) or ks[0] * ks[1] > 1024:
        raise ValueError(f"{owner}: kernel_size must be an int >= 1 or a pair (kh, kw) of them with "
                         f"kh * kw <= 1024; got {kernel_size!r}")
    return ks  # type: ignore[return-value]


def window_pool(x: torch.Tensor, kernel_size: int | tuple[int, int] = 2, *, mode: str = "max") -> torch.Tensor:
    """Max or mean over the non-overlapping ``kernel_size`` windows of ``x``: ``F.max_pool2d`` /
    ``F.avg_pool2d`` with stride = kernel, no padding, floor mode.

    Args:
        x: (N, C, H, W) float32, float64, float16 or bfloat16, NCHW or channels_last (read without a
            copy; other strides are copied once); H >= kh and W >= kw.
        kernel_size: kh = kw, or (kh, kw); kh * kw <= 1024.
        mode: "max" (NaN propagates, ties go to the first element in row-major window order, as in
            PyTorch) or "avg" (the window's mean, accumulated in float32 for 16-bit dtypes).

    Returns:
        (N, C, H // kh, W // kw) in x's dtype and memory format. Differentiable w.r.t. x once: the
        gradient goes to each window's argmax (max) or is spread evenly over the window (avg); rows
        and columns past the last whole window get 0. Double backward raises: use
        ``exml_fast.reference.window_pool`` for it.
    """
    kh, kw = _pair(kernel_size, "window_pool")
    check_image_batch(x, "window_pool")
    if x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"window_pool: x must be at least one window ({kh} x {kw}) high and wide; got shape "
                         f"{tuple(x.shape)}")
    check_choice(mode, "mode", "window_pool", MODES)
    if _ext.use_compiled(x):
        return torch.ops.exml_fast.window_pool(x, kh, kw, mode == "max")
    return _ref_window_pool(x, (kh, kw), mode)


def _window_of(m: nn.Module) -> tuple[int, int, bool] | None:
    """(kh, kw, is_max): the window_pool call that reproduces pooling layer ``m``, else None."""
    if type(m) not in (nn.MaxPool2d, nn.AvgPool2d):  # exactly these: subclasses may override forward
        return None
    is_max = type(m) is nn.MaxPool2d
    kernel = _as_pair(m.kernel_size)
    stride = kernel if m.stride is None else _as_pair(m.stride)
    ok = (stride == kernel and not m.ceil_mode and m.padding in (0, (0, 0))
          and (not m.return_indices and m.dilation in (1, (1, 1)) if is_max else m.divisor_override is None))
    return (*kernel, is_max) if ok else None


def _as_pair(v) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    return tuple(v) if isinstance(v, (tuple, list)) and len(v) == 2 else None


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kh, kw, is_max = self.__dict__[PLAN_KEY]
    if (x.dim() == 4 and x.device.type == "cpu" and x.dtype in FLOAT_DTYPES and x.shape[2] >= kh
            and x.shape[3] >= kw and x.is_contiguous() and _ext.has_ops()):
        return torch.ops.exml_fast.window_pool(x, kh, kw, is_max)
    return type(self).forward(self, x)


@contextlib.contextmanager
def fast_pooling(*models: nn.Module) -> Iterator[None]:
    """Within the block, the eligible pooling layers of ``models`` run :func:`window_pool` on the CPU.

    Eligible: ``nn.MaxPool2d`` and ``nn.AvgPool2d`` (exactly those classes) with stride = kernel, no
    padding, dilation 1, no ``ceil_mode``, no ``return_indices`` and no ``divisor_override``: the layers
    whose result ``window_pool`` reproduces (values and first derivatives). At call time a 4-D float
    NCHW-contiguous CPU input takes the fused op (3-8x PyTorch's eager pooling, 1.3-5x compiled, in
    benches/results/window_pool_cpu.md); anything else takes the layer's own forward: channels_last (where
    the op beat PyTorch's eager kernel at 6 channels but not at 16, and not compiled average pooling), CUDA
    (the op's kernel has not run on a GPU yet), unbatched input, no compiled library. Double backward through a
    swapped layer raises. Restored on exit, also after an exception; a layer already patched (a nested
    block) is left to its owner.
    """
    with patched_forwards(models if FAST_POOLING else (), _window_of, _forward):
        yield


def _register() -> None:
    """Fake kernels and autograd for the compiled ops (only when _C loaded)."""

    def _format(x):
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if cl else torch.contiguous_format

    @torch.library.register_fake("exml_fast::window_pool")
    def _window_pool_fake(x, kh, kw, is_max):
        n, c, h, w = x.shape
        return torch.empty((n, c, h // kh, w // kw), dtype=x.dtype, device=x.device,
                           memory_format=_format(x))

    @torch.library.register_fake("exml_fast::_window_pool_backward")
    def _window_pool_backward_fake(grad, x, kh, kw, is_max):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x))

    # The autograd of both ops is registered in C++ (csrc/ops/window_pool.cpp): the Python register_autograd
    # wrappers cost about as much per call as the kernels on a distillation step's batch-32 activations.


if _ext.has_ops():
    _register()
