"""Reference image priors of model inversion (DeepInversion / Ex-Model CL public code).

Plain torch ops (slicing, norms, a depthwise F.conv2d) in the accumulation dtype:
float32, float64 for float64 input. The test oracle and benchmark baseline of
`exml_fast.ops.image_priors`, and its fallback when the compiled library is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exml_fast._utils.dtypes import acc_dtype

BLUR_KERNEL_SIZES = (3, 7)



#: The Ex-Model CL reference code's blur: a 7 x 7 Gaussian of sigma 1.
REFERENCE_CODE_BLUR_SIGMA = 1.0


def torchvision_blur_sigma(kernel_size: int) -> float:
    """torchvision's default sigma of a Gaussian blur, 0.3 * ((k - 1) / 2 - 1) + 0.8: 0.8 for 3, 1.4 for 7.

    (The compiled op's own default when its schema's ``blur_sigma`` is None; the Python wrappers always
    pass :func:`default_blur_sigma`.)
    """
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def default_blur_sigma(kernel_size: int) -> float:
    """The blur prior's sigma when none is given: 0.8 for 3 (torchvision's rule; the paper gives none for
    its 3 x 3 Gaussian), 1.0 for 7 (the Ex-Model CL reference code's 7 x 7 Gaussian)."""
    return REFERENCE_CODE_BLUR_SIGMA if kernel_size == 7 else torchvision_blur_sigma(kernel_size)


def gaussian_kernel2d(kernel_size: int, sigma: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """torchvision's separable Gaussian kernel, (k, k), summing to 1."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    return torch.outer(k1, k1).to(dtype=dtype, device=device)


def _shifts(x: torch.Tensor) -> list[torch.Tensor]:
    return [
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    ]


def image_priors(
    x: torch.Tensor,
    *,
    blur_kernel_size: int = 3,
    blur_sigma: float | None = None,
    per_sample: bool = False,
    blur_per_sample_norm: bool = False,
) -> torch.Tensor:
    """`(tv_l1, tv_l2, blur, l2)` of (N, C, H, W) `x`; see `exml_fast.ops.image_priors`.

    Returns (4,) or, with `per_sample`, (N, 4), in float32 (float64 for float64 x).
    """
    sigma = default_blur_sigma(blur_kernel_size) if blur_sigma is None else float(blur_sigma)
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    n, c = xa.shape[:2]
    zero = xa.new_zeros((n,) if per_sample else ())
    tv_l1, tv_l2 = zero, zero
    for d in _shifts(xa):
        if d.numel() == 0:  # H or W == 1: no pairs, contributes 0
            continue
        if per_sample:
            flat = d.reshape(n, -1)
            tv_l1 = tv_l1 + flat.abs().mean(dim=1)
            tv_l2 = tv_l2 + torch.linalg.vector_norm(flat, dim=1)
        else:
            tv_l1 = tv_l1 + d.abs().mean()
            tv_l2 = tv_l2 + torch.norm(d)
    g = gaussian_kernel2d(blur_kernel_size, sigma, dtype=acc, device=x.device)
    blurred = F.conv2d(xa, g.expand(c, 1, blur_kernel_size, blur_kernel_size),
                       padding=blur_kernel_size // 2, groups=c)
    r = (xa - blurred).reshape(n, -1)
    if blur_per_sample_norm:
        blur = torch.linalg.vector_norm(r, dim=1)
    else:
        blur = r.square().sum(dim=1)
    l2 = xa.reshape(n, -1).square().sum(dim=1)
    if per_sample:
        return torch.stack([tv_l1, tv_l2, blur, l2], dim=1)
    return torch.stack([tv_l1, tv_l2, blur.sum(), l2.sum()])


def tv_l2(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's l2 total variation of (N, C, H, W) `x`: the sum of the
    Frobenius norms of the differences with four one-pixel shifts (horizontal,
    vertical and both diagonals). Returns a scalar in x's dtype (the public code's
    form, computed without the accumulation-dtype upcast of `image_priors`)."""
    return sum(torch.norm(d) for d in _shifts(x))


def tv_l1(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's l1 total variation: the sum over the four shifts of mean |D_k|."""
    return sum(d.abs().mean() for d in _shifts(x) if d.numel() > 0)


__all__ = ["BLUR_KERNEL_SIZES", "REFERENCE_CODE_BLUR_SIGMA", "default_blur_sigma", "gaussian_kernel2d", "image_priors",
           "torchvision_blur_sigma", "tv_l1", "tv_l2"]
