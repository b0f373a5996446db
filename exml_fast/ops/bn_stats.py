"""BatchNorm-statistic matching: `bn_stats` and `bn_stats_loss`."""

from __future__ import annotations

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_choice, check_float_dtype, check_tensor
from exml_fast import reference as _ref
from exml_fast.reference.bn_stats import BN_LOSS_FORMS, acc_dtype, combine_bn_loss



def _check_x(x: torch.Tensor, op: str) -> None:
    check_tensor(x, "x", op)
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"{op}: x must have shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); "
            f"got {x.dim()} dims with shape {tuple(x.shape)}"
        )
    check_float_dtype(x, "x", op)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one channel (dim 1); got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(
            f"{op}: x has no elements to take statistics over (empty batch or spatial dim); "
            f"got shape {tuple(x.shape)}"
        )


def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of `x` over every dim but dim 1.

    Args:
        x: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); float32, float64,
            float16 or bfloat16; contiguous or channels_last (read without a
            copy; other strides are copied once).

    Returns:
        `(mean, var)`, each of shape (C,), float32 (float64 for float64 input).
        Accumulation is in that dtype whatever x's dtype. Differentiable with
        respect to x (once: double backward raises).
    """
    _check_x(x, "bn_stats")
    if _ext.use_compiled(x):
        return torch.ops.exml_fast.bn_stats(x)
    return _ref.bn_stats(x)


def check_running_stat(t: torch.Tensor, name: str, channels: int, x: torch.Tensor, op: str = "bn_stats_loss") -> None:
    """Raises unless ``t`` (argument ``name`` of ``op``) is a floating (channels,) tensor on x's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"{op}: {name} must have shape ({channels},) to match the {channels} "
            f"channels of x; got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor; got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def bn_stats_loss(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    form: str = "l2",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Distance between `x`'s batch statistics and a BatchNorm layer's running ones.

    Args:
        x: a BatchNorm layer's input, as in `bn_stats`.
        running_mean, running_var: (C,) floating tensors on x's device.
        form: "l2" — `||mean - rm||_2 + ||var - rv||_2` (DeepInversion, un-squared
            norms); "mse" — the mean over channels of the squared differences of
            the means plus that of the variances; "sq_std" —
            `||mean - rm||^2 + ||sqrt(var + eps) - sqrt(rv + eps)||^2` (the ExML paper).
        eps: added under the square roots of "sq_std" (BatchNorm's own eps), which
            keeps the gradient finite where a channel's variance is 0.

    Returns:
        A scalar tensor, float32 (float64 for float64 x).
    """
    check_choice(form, "form", "bn_stats_loss", BN_LOSS_FORMS)
    _check_x(x, "bn_stats_loss")
    check_running_stat(running_mean, "running_mean", x.shape[1], x)
    check_running_stat(running_var, "running_var", x.shape[1], x)
    mean, var = bn_stats(x)
    return combine_bn_loss(mean, var, running_mean, running_var, form=form, eps=eps)


def frozen_bn_stats(x: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frozen (eval-mode) BatchNorm fused with the statistics of its input.

    Returns ``(y, mean, var)``: ``y = x * scale_c + shift_c`` (the layer's output,
    in x's dtype and memory format) and ``bn_stats(x)``. One kernel (CPU or
    CUDA) reads x once for both, and its backward is one sweep that produces the
    whole input gradient, ``grad_y · scale_c`` plus the statistics' part — where
    the unfused pair costs a BatchNorm backward, a bn_stats backward and the
    sum of the two gradients (BN-statistic matching's hot path in synthesis;
    :class:`exml_fast.synth.BNStatsMatcher` uses it for eval-mode layers of a
    frozen model). Without the compiled library, or on other devices, the
    affine map and :func:`bn_stats` run as separate passes (same values).

    Args:
        x: as in :func:`bn_stats`.
        scale, shift: (C,) tensors on x's device (see
            :func:`exml_fast.reference.bn_stats.frozen_bn_scale_shift`); they
            are cast to the accumulation dtype (fp32, fp64 for fp64 x) and get
            no gradient.

    Differentiable with respect to x (once: double backward raises).
    """
    _check_x(x, "frozen_bn_stats")
    acc = acc_dtype(x.dtype)
    for t, name in ((scale, "scale"), (shift, "shift")):
        check_running_stat(t, name, x.shape[1], x, op="frozen_bn_stats")
    scale = scale.detach().to(acc)
    shift = shift.detach().to(acc)
    if _ext.use_compiled(x) and x.device.type in ("cpu", "cuda"):
        return torch.ops.exml_fast.frozen_bn_stats(x, scale, shift)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x.to(acc) * scale.view(shape) + shift.view(shape)).to(x.dtype)
    mean, var = bn_stats(x)
    return y, mean, var


def _register() -> None:
    """Fake kernels of the compiled ops (only when _C loaded). Their autograd is registered in C++
    (csrc/ops/bn_stats.cpp): the matcher calls them once per BatchNorm layer and step, where a Python
    autograd node per call would cost more host time than the GPU kernels take."""

    @torch.library.register_fake("exml_fast::bn_stats")
    def _bn_stats_fake(x):
        acc = acc_dtype(x.dtype)
        c = x.shape[1]
        return x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)

    @torch.library.register_fake("exml_fast::_bn_stats_backward")
    def _bn_stats_backward_fake(grad_mean, grad_var, x, mean):
        return torch.empty_like(x)

    @torch.library.register_fake("exml_fast::frozen_bn_stats")
    def _frozen_fake(x, scale, shift):
        acc = acc_dtype(x.dtype)
        c = x.shape[1]
        return torch.empty_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)

    @torch.library.register_fake("exml_fast::_frozen_bn_stats_backward")
    def _frozen_backward_fake(grad_y, grad_mean, grad_var, x, mean, scale):
        return torch.empty_like(x)


if _ext.has_ops():
    _register()
