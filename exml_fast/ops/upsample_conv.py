"""Nearest 2× upsampling followed by a 3×3 convolution, without the upsampled tensor: `upsample2x_conv3x3`.

SKD's Table IV generator (the ``"skd-small"`` / ``"skd-narrow"`` knowledge delegator, and DAFL's generator)
upsamples twice by nearest neighbour and convolves each result with a 3×3 kernel. Every output pixel of
such a pair reads only a 2×2 window of the *low*-resolution input: along each axis, output row ``2i + a``
sees input rows ``i - 1, i`` (phase ``a = 0``: taps ``w0`` and ``w1 + w2``) or ``i, i + 1`` (``a = 1``:
``w0 + w1`` and ``w2``). So the four output phases are four 2×2 convolutions of the input, computed here as
one convolution with ``4·C_out`` output channels whose kernels are those tap sums, then interleaved. That is
16 multiply-adds per output pixel and input channel instead of 36 (2.25× fewer FLOPs, less the one-pixel
border the single convolution also computes), and the 4×-sized upsampled tensor is never written. PyTorch's
contiguous-layout CPU ``upsample_nearest2d`` alone took about as long as the convolution after it in a
``skd-small`` fit (benches/bench_upsample_conv.py measures both, and a whole fit step).

It is a composite of ATen ops (no compiled kernel: the saving is in the arithmetic, not in a fused loop), so
autograd, every device and dtype, and ``torch.compile`` come with them. The results equal the reference's
(`exml_fast.reference.upsample_conv`) up to the order of the float additions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.checks import check_float_dtype, check_image_batch, check_tensor

__all__ = ["fusable_upsample_conv", "upsample2x_conv3x3"]

# _TAPS[a, t, k]: how much of the 3×3 kernel's tap k reaches low-resolution offset t (0: i - 1 + a,
# 1: i + a) for output phase a.
_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``, computed as four
    2×2 convolutions of ``x`` (see the module docstring).

    Args:
        x: (N, C, H, W), float32, float64, float16 or bfloat16.
        weight: (C_out, C, 3, 3), x's dtype and device.
        bias: (C_out,) or None.

    Returns:
        (N, C_out, 2H, 2W) in x's dtype, contiguous.
    """
    owner = "upsample2x_conv3x3"
    check_image_batch(x, owner)
    check_tensor(weight, "weight", owner)
    check_float_dtype(weight, "weight", owner)
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{owner}: weight must have shape (C_out, {x.shape[1]}, 3, 3) for x of {x.shape[1]} "
                         f"channels; got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{owner}: weight must have x's dtype and device ({x.dtype}, {x.device}); got "
                         f"{weight.dtype}, {weight.device}")
    out_ch = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", owner)
        if tuple(bias.shape) != (out_ch,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"{owner}: bias must be None or have shape ({out_ch},) and x's dtype and device; "
                             f"got shape {tuple(bias.shape)}, {bias.dtype}, {bias.device}")
    n, _, h, w = x.shape
    taps = torch.tensor(_TAPS, dtype=weight.dtype, device=weight.device)
    # phase_w[a, b, o, c, t, u] = sum_kl taps[a, t, k] taps[b, u, l] weight[o, c, k, l]
    phase_w = torch.einsum("atk,bul,ockl->aboctu", taps, taps, weight).reshape(4 * out_ch, x.shape[1], 2, 2)
    y = F.conv2d(x, phase_w, None if bias is None else bias.repeat(4), padding=1)  # (N, 4·C_out, H+1, W+1)
    return _Phases.apply(y.view(n, 2, 2, out_ch, h + 1, w + 1), False)


def _interleave(y: torch.Tensor) -> torch.Tensor:
    """(N, 2, 2, C, H+1, W+1) phase outputs → (N, C, 2H, 2W): phase (a, b) at low-resolution position
    (i, j) is ``y[:, a, b, :, i + a, j + b]``, the output pixel (2i + a, 2j + b)."""
    n, _, _, c, h1, w1 = y.shape
    out = y.new_empty(n, c, h1 - 1, 2, w1 - 1, 2)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = y[:, a, b, :, a:a + h1 - 1, b:b + w1 - 1]
    return out.view(n, c, 2 * (h1 - 1), 2 * (w1 - 1))


def _deinterleave(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_interleave`: (N, C, 2H, 2W) → (N, 2, 2, C, H+1, W+1), zero where no output
    pixel reads."""
    n, c, h2, w2 = g.shape
    h, w = h2 // 2, w2 // 2
    g6 = g.reshape(n, c, h, 2, w, 2)
    out = g.new_zeros(n, 2, 2, c, h + 1, w + 1)
    for a in (0, 1):
        for b in (0, 1):
            out[:, a, b, :, a:a + h, b:b + w] = g6[:, :, :, a, :, b]
    return out


class _Phases(torch.autograd.Function):
    """:func:`_interleave` (``adjoint`` False) or :func:`_deinterleave` (True); each one's gradient is the
    other, so double backward works. One strided copy each way: autograd through slicing and stacking instead
    wrote a zero-filled tensor of y's size per phase in the backward, the larger part of the layer's backward
    time."""

    @staticmethod
    def forward(ctx, t, adjoint: bool):
        ctx.adjoint = adjoint
        return _deinterleave(t) if adjoint else _interleave(t)

    @staticmethod
    def backward(ctx, g):
        return _Phases.apply(g, not ctx.adjoint), None


def fusable_upsample_conv(upsample: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(upsample(x))`` is what :func:`upsample2x_conv3x3` computes: an ``nn.Upsample`` by 2
    (nearest, no size) then an ``nn.Conv2d`` with a 3×3 kernel, stride 1, padding 1 (zeros), no dilation, one
    group."""
    if type(upsample) is not nn.Upsample or type(conv) is not nn.Conv2d:
        return False
    scale = upsample.scale_factor
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    return (upsample.mode == "nearest" and upsample.size is None and all(float(s) == 2.0 for s in scales)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")
