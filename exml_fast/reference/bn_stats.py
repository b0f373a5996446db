"""Reference BatchNorm-statistic math, as in the public DeepInversion hook."""

from __future__ import annotations

import torch

from exml_fast._utils.dtypes import acc_dtype

BN_LOSS_FORMS = ("l2", "mse", "sq_std")



def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dim but dim 1.

    The DeepInversion hook's computation: `mean` over the reduced dims, then a
    permute-contiguous copy to take the variance. It runs in x's dtype (as the
    hook did) and returns the accumulation dtype of the fused op (fp32, fp64
    for fp64 input) so both have one signature.
    """
    nch = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    perm = [1, 0] + list(range(2, x.dim()))
    var = x.permute(perm).contiguous().view([nch, -1]).var(1, unbiased=False)
    acc = acc_dtype(x.dtype)
    return mean.to(acc), var.to(acc)


def frozen_bn_scale_shift(
    running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,) in ``dtype``, of an eval-mode BatchNorm: ``y = x * scale + shift``.

    scale = weight / sqrt(running_var + eps) (weight 1 without affine), shift = bias − running_mean · scale.
    """
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def frozen_bn_stats(x: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frozen BatchNorm and the statistics of its input: ``(x * scale_c + shift_c, *bn_stats(x))``.

    The affine map runs in the accumulation dtype (scale's) and is rounded to x's dtype; y keeps x's
    memory format.
    """
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x.to(scale.dtype) * scale.view(shape) + shift.view(shape)).to(x.dtype)
    mean, var = bn_stats(x)
    return y, mean, var


def bn_stats_loss(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    form: str = "l2",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Distance between x's batch statistics and a BatchNorm layer's running ones.

    Forms: "l2" `||mean - rm||_2 + ||var - rv||_2` (DeepInversion); "mse" the
    mean over channels of the squared differences of mean and of var; "sq_std"
    `||mean - rm||^2 + ||sqrt(var + eps) - sqrt(rv + eps)||^2` (the ExML paper).
    """
    mean, var = bn_stats(x)
    return combine_bn_loss(mean, var, running_mean, running_var, form=form, eps=eps)


def combine_bn_loss(
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    form: str,
    eps: float,
) -> torch.Tensor:
    """The loss of `form` from batch and running statistics, all of shape (C,)."""
    rm = running_mean.to(mean.dtype)
    rv = running_var.to(var.dtype)
    if form == "l2":
        return torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv)
    if form == "mse":
        return (mean - rm).square().mean() + (var - rv).square().mean()
    if form == "sq_std":
        return (mean - rm).square().sum() + (
            torch.sqrt(var + eps) - torch.sqrt(rv + eps)
        ).square().sum()
    raise ValueError(f"form must be one of {BN_LOSS_FORMS}; got {form!r}")
