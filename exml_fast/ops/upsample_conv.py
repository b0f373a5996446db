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
from torch.utils.weak import WeakIdKeyDictionary

from exml_fast._utils.checks import check_float_dtype, check_image_batch, check_tensor
from exml_fast._utils.dtypes import autocast_dtype

__all__ = ["fusable_upsample_conv", "upsample2x_conv3x3"]

# The tap matrices per (device, dtype), and the combined phase weights of weights that need no gradient
# (a frozen generator's layers), per weight tensor: its entry goes when the weight is freed, and is
# recomputed when the weight changes in place (its _version moves) or gets new data (.data = ...).
# In-place writes through .data do not move _version and are not seen.
_TAPS_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_PHASE_CACHE = WeakIdKeyDictionary()


def _in_graph(device: torch.device) -> bool:
    """Whether tensors made now belong to a graph (torch.compile's tracing, a CUDA graph capture): they are
    then built in it and never cached, since a cached traced or captured tensor is unwritten outside it."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _build_taps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """taps[a, t, k]: 1 where the 3×3 kernel's tap k reaches low-resolution offset t (0: i - 1 + a, 1: i + a)
    for output phase a, else 0: [[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]]. Output row 2i + a's tap k
    reads upsampled row 2i + a + k - 1, low-resolution row i + ⌊(a + k - 1) / 2⌋, so t = ⌊(a + k + 1) / 2⌋ - a.
    Built on the device (no copy from host memory, which a CUDA graph capture forbids)."""
    a = torch.arange(2, device=device).view(2, 1, 1)
    t = torch.arange(2, device=device).view(1, 2, 1)
    k = torch.arange(3, device=device).view(1, 1, 3)
    return ((a + k + 1) // 2 - a == t).to(dtype)


def _taps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if _in_graph(device):
        return _build_taps(device, dtype)
    taps = _TAPS_CACHE.get((device, dtype))
    if taps is None:
        taps = _TAPS_CACHE[(device, dtype)] = _build_taps(device, dtype)
    return taps


def _combine(weight: torch.Tensor) -> torch.Tensor:
    """The (4·C_out, C, 2, 2) phase kernels: phase_w[a, b, o, c, t, u] = sum_kl taps[a, t, k] taps[b, u, l]
    weight[o, c, k, l]."""
    taps = _taps(weight.device, weight.dtype)
    return torch.einsum("atk,bul,ockl->aboctu", taps, taps, weight).reshape(4 * weight.shape[0],
                                                                            weight.shape[1], 2, 2)


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """:func:`_combine` of `weight`, cached while the weight needs no gradient (else the sums stay in
    autograd's graph), is a plain tensor or parameter (a subclass may have no storage to identify it by),
    and outside graphs and inference mode (whose tensors autograd cannot save later)."""
    if ((weight.requires_grad and torch.is_grad_enabled()) or type(weight) not in (torch.Tensor, nn.Parameter)
            or _in_graph(weight.device) or torch.is_inference_mode_enabled()):
        return _combine(weight)
    stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.shape, weight.stride())
    hit = _PHASE_CACHE.get(weight)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    phase_w = _combine(weight)
    _PHASE_CACHE[weight] = (stamp, phase_w)
    return phase_w


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``, computed as four
    2×2 convolutions of ``x`` (see the module docstring).

    Args:
        x: (N, C, H, W), float32, float64, float16 or bfloat16.
        weight: (C_out, C, 3, 3), x's dtype and device.
        bias: (C_out,) or None.

    Returns:
        (N, C_out, 2H, 2W) in x's dtype, contiguous. Under ``torch.autocast`` it follows ``conv2d``'s policy
        instead: float32 and 16-bit inputs are cast to the autocast dtype (float64 ones are not), so that a
        float32 weight meets the 16-bit activations of the layers before it, and the output has that dtype.

    The tap matrices are built once per (device, dtype), and the combined 2×2 kernels once per weight
    that needs no gradient (a frozen generator's; recomputed when it changes in place, but not after an
    in-place write through ``weight.data``, which PyTorch does not count); a weight that needs one keeps
    them in autograd's graph. Under torch.compile's tracing and CUDA graph capture both are built in the
    graph (never from host memory) and not cached.
    """
    owner = "upsample2x_conv3x3"
    check_image_batch(x, owner)
    check_tensor(weight, "weight", owner)
    check_float_dtype(weight, "weight", owner)
    if bias is not None:
        check_tensor(bias, "bias", owner)
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        # conv2d's autocast policy (it is on the lower-precision list of CPU and CUDA autocast): the float32
        # (and 16-bit) inputs cast to the autocast dtype, float64 ones left as they are; then the whole op runs
        # outside autocast, so the cached phase kernels are those of the cast weight.
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.dtype == torch.float64 else t.to(dtype)

        with torch.autocast(x.device.type, enabled=False):
            return upsample2x_conv3x3(cast(x), cast(weight), cast(bias))
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{owner}: weight must have shape (C_out, {x.shape[1]}, 3, 3) for x of {x.shape[1]} "
                         f"channels; got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{owner}: weight must have x's dtype and device ({x.dtype}, {x.device}); got "
                         f"{weight.dtype}, {weight.device}")
    out_ch = weight.shape[0]
    if bias is not None:
        if tuple(bias.shape) != (out_ch,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"{owner}: bias must be None or have shape ({out_ch},) and x's dtype and device; "
                             f"got shape {tuple(bias.shape)}, {bias.dtype}, {bias.device}")
    n, _, h, w = x.shape
    phase_w = _phase_weight(weight)
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
