"""Fused natural-image priors of model inversion: `image_priors`."""

from __future__ import annotations

import math

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_choice, check_image_batch
from exml_fast.reference.image_priors import BLUR_KERNEL_SIZES, acc_dtype, default_blur_sigma
from exml_fast.reference.image_priors import image_priors as _ref_image_priors

_N_SUMS = 10


def _check_args(x, blur_kernel_size, blur_sigma) -> float:
    check_image_batch(x, "image_priors")
    if x.numel() == 0:
        raise ValueError(
            f"image_priors: x must not be empty (N, C, H and W >= 1); got shape {tuple(x.shape)}"
        )
    check_choice(blur_kernel_size, "blur_kernel_size", "image_priors", BLUR_KERNEL_SIZES)
    if blur_sigma is None:
        return default_blur_sigma(blur_kernel_size)
    if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)):
        raise TypeError(f"image_priors: blur_sigma must be a float > 0 or None; got {blur_sigma!r}")
    if not (math.isfinite(blur_sigma) and blur_sigma > 0):
        raise ValueError(f"image_priors: blur_sigma must be a finite number > 0; got {blur_sigma!r}")
    return float(blur_sigma)


def image_priors(
    x: torch.Tensor,
    *,
    blur_kernel_size: int = 3,
    blur_sigma: float | None = None,
    per_sample: bool = False,
    blur_per_sample_norm: bool = False,
) -> torch.Tensor:
    """The four natural-image priors of model inversion, in one pass over `x`.

    With the one-pixel shifts D1 = x[..., :, :-1] - x[..., :, 1:] (horizontal),
    D2 = x[..., :-1, :] - x[..., 1:, :] (vertical), D3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    and D4 = x[..., :-1, :-1] - x[..., 1:, 1:] (diagonals), and G a depthwise
    Gaussian of `blur_kernel_size` with zero 'same' padding:

    - tv_l1 = sum_k mean(|D_k|) (DeepInversion's l1 TV);
    - tv_l2 = sum_k ||D_k||_F (DeepInversion's l2 TV, norms not squared);
    - blur = ||x - G*x||^2 (Ex-Model CL), or with `blur_per_sample_norm`
      sum_n ||x_n - G*x_n||_2 (its reference code, with a 7 x 7 G of sigma 1).
      The two differ in scale: at x ~ N(0, 1) of 1 x 32 x 32, per image,
      ||x - G3*x||^2 is about 620 and ||x - G7*x||_2 about 28 — 22 times
      less (47 times less in gradient), more for larger images, less as x
      smooths. The Ex-Model CL blur weights (1e-3 MNIST, 1e-2 CIFAR) were
      tuned for the reference code's form;
    - l2 = ||x||^2.

    A shift with no pairs (H or W == 1) contributes 0.

    Args:
        x: (N, C, H, W) float32, float64, float16 or bfloat16; NCHW or
            channels_last are read without a copy (other strides are copied once).
        blur_kernel_size: 3 (the paper) or 7 (the reference code, with sigma 1).
        blur_sigma: the Gaussian's sigma in pixels, > 0; None: 0.8 for 3
            (torchvision's rule) and 1.0 for 7 (the reference code's);
            see `exml_fast.reference.image_priors.default_blur_sigma`.
        per_sample: return one row per sample: the means and norms are then taken
            over that sample's elements.
        blur_per_sample_norm: the blur entry is the per-sample non-squared norm
            (summed over the batch unless `per_sample`).

    Returns:
        `(tv_l1, tv_l2, blur, l2)` as a (4,) tensor, or (N, 4) with `per_sample`,
        float32 (float64 for float64 x). Differentiable w.r.t. x (once: double
        backward raises); zero norms get zero gradient and sign(0) = 0.
    """
    sigma = _check_args(x, blur_kernel_size, blur_sigma)
    if _ext.use_compiled(x):
        out, _ = torch.ops.exml_fast.image_priors(
            x, blur_kernel_size, sigma, bool(per_sample), bool(blur_per_sample_norm)
        )
        return out
    return _ref_image_priors(x, blur_kernel_size=blur_kernel_size, blur_sigma=sigma,
                             per_sample=per_sample, blur_per_sample_norm=blur_per_sample_norm)


def _register() -> None:
    """Fake kernels for the compiled ops (only when _C loaded). Their autograd is in C++
    (csrc/ops/image_priors.cpp): a Python autograd node would cost more per call than the kernels."""

    @torch.library.register_fake("exml_fast::image_priors")
    def _image_priors_fake(x, blur_kernel_size=3, blur_sigma=None, per_sample=False,
                           blur_per_sample_norm=False):
        n = x.shape[0]
        shape = (n, 4) if per_sample else (4,)
        return (x.new_empty(shape, dtype=acc_dtype(x.dtype)),
                x.new_empty((n, _N_SUMS), dtype=torch.float64))

    @torch.library.register_fake("exml_fast::_image_priors_backward")
    def _image_priors_backward_fake(grad, x, sums, blur_kernel_size=3, blur_sigma=None,
                                    per_sample=False, blur_per_sample_norm=False):
        return torch.empty_like(x)


if _ext.has_ops():
    _register()
