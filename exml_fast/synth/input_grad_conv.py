"""Input-gradient convolutions for frozen teachers on the CPU.

Synthesis differentiates the teacher with respect to its input only. On the
CPU, PyTorch's convolution backward (oneDNN) is slow for the small layers of
MNIST-sized networks: for LeNet-5's first layer (1 → 6 channels, 5×5, batch
256) it costs about nine forwards, and it was over half of a model-inversion
step (benches/results/exml_profile_cpu.md). The input gradient of a stride-1
convolution is itself a convolution — of the output gradient with the
kernel transposed (in ↔ out channels) and rotated by 180°, padded by
``k − 1 − p`` — which costs about one forward.

:func:`input_grad_convs` swaps that backward in, for the duration of a
synthesis, on every eligible ``nn.Conv2d`` of a frozen model: stride 1,
dilation 1, one group, zero padding of at most ``k − 1``, parameters not
requiring gradients, float32 on the CPU, and at most ``_SWAP_MAX_IN_CHANNELS``
input channels — the layer shapes where it was measured to win. Everything
else keeps PyTorch's own path. Set ``FAST_INPUT_GRAD = False`` to turn it off (tests compare the two).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from exml_fast._utils.patching import patched_forwards

#: Use the input-gradient convolution in synthesis on the CPU (see the module docstring).
FAST_INPUT_GRAD = True

# The swap runs for layers with at most this many input channels. Measured per layer shape (batch 256 and
# 64, NCHW and channels_last, AVX-512 and AVX2 oneDNN; benches/results/synthesis_cpu.md): oneDNN's input
# gradient of LeNet-5's 1 -> 6 first layer cost 3-6 forwards and the swap one; for every layer of 3 or more
# input channels (LeNet's 6 -> 16, ResNet's 3 -> 64 ... 512 -> 512) the two were within noise or oneDNN's
# backward was faster, so those keep PyTorch's path.
_SWAP_MAX_IN_CHANNELS = 2

# Below this many input channels (the flipped convolution's outputs), PyTorch's im2col + GEMM
# convolution beats oneDNN's on the CPU (LeNet-5's first layer: 7 ms vs 17 ms at batch 256).
_IM2COL_BELOW = 4


def flip_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The kernel of the input-gradient convolution: in ↔ out channels swapped, rotated by 180°."""
    return weight.transpose(0, 1).flip(-2, -1).contiguous()


def conv2d_input_grad(grad: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int],
                      flipped: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, weight, padding=padding)`` (stride 1) with respect to ``x``.

    ``flipped``: ``flip_kernel(weight)`` when the caller keeps it (a frozen weight's flip is made
    once per synthesis, not once per step: for ResNet-34 the flips cost about 5 % of a step).
    """
    kh, kw = weight.shape[-2:]
    if flipped is None:
        flipped = flip_kernel(weight)
    pad = (kh - 1 - padding[0], kw - 1 - padding[1])
    if weight.shape[1] >= _IM2COL_BELOW:
        return F.conv2d(grad, flipped, padding=pad)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.conv2d(grad, flipped, padding=pad)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


class _InputGradConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, flipped):
        ctx.save_for_backward(weight, flipped)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, flipped = ctx.saved_tensors
        return conv2d_input_grad(grad.contiguous(), weight, ctx.padding, flipped), None, None, None, None


def _eligible(m: nn.Module) -> bool:
    if type(m) is not nn.Conv2d:  # subclasses may override forward
        return False
    k = m.kernel_size
    return (m.in_channels <= _SWAP_MAX_IN_CHANNELS
            and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple) and all(0 <= p <= kk - 1 for p, kk in zip(m.padding, k))
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32)


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if (x.requires_grad and x.dtype == torch.float32 and not self.weight.requires_grad
            and (self.bias is None or not self.bias.requires_grad) and torch.is_grad_enabled()):
        cached = self.__dict__.get("_exml_flipped")
        if cached is None or cached[0] != self.weight._version or cached[1] is not self.weight:
            cached = (self.weight._version, self.weight, flip_kernel(self.weight))
            self.__dict__["_exml_flipped"] = cached
        return _InputGradConv2d.apply(x, self.weight, self.bias, self.padding, cached[2])
    return nn.Conv2d.forward(self, x)


@contextlib.contextmanager
def input_grad_convs(model: nn.Module):
    """Within the block, eligible convolutions of ``model`` compute only the input gradient, as a convolution.

    A convolution whose weight requires gradients at call time takes PyTorch's path, so the result is
    always correct; the swap only pays off for a frozen model. Restored on exit, also after an exception.
    """
    with patched_forwards((model,) if FAST_INPUT_GRAD else (), lambda m: True if _eligible(m) else None, _forward,
                          scratch=("_exml_flipped",)):
        yield model
