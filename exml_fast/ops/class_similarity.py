"""`class_similarity`: the row-normalised cosine similarity of a classifier's class vectors (Data Impressions,
Nayak et al. 2019), whose rows scaled by β are the Dirichlet concentrations of `dirichlet_targets`."""

from __future__ import annotations

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_float_dtype
from exml_fast._utils.dtypes import acc_dtype
from exml_fast.reference.class_similarity import class_similarity as _ref_class_similarity

__all__ = ["class_similarity"]


def class_similarity(weight: torch.Tensor, *, floor: float = 1e-4) -> torch.Tensor:
    """Row-normalised cosine similarity of a classifier's class vectors.

    `C[i, j] = cos(w_i, w_j)`; each row is then min-max scaled to [0, 1],
    `(C[i, j] - min_j C[i]) / (max_j C[i] - min_j C[i])`, and floored with
    `clamp_min(floor)` so every entry can serve as a Dirichlet concentration.
    A constant row (K = 1, or a range below 8 eps of the compute dtype: every
    class equally similar) is all ones, with zero gradient. The diagonal is 1
    (each class is its own nearest class).

    Args:
        weight: (K, H) final-layer weight, float32/64/16 or bfloat16, K >= 0.
            A row of zeros has no direction: on CPU it raises RuntimeError
            naming it; on CUDA it is not checked (that would cost a host
            sync) and the whole output is NaN (every row's min-max scaling
            reads the undefined column).
        floor: the smallest output value, in (0, 1].

    Returns:
        (K, K), float32 (float64 for float64 weight). Differentiable with
        respect to `weight` (once); the gradient of min/max is shared evenly
        between tied entries, as torch.amin/amax do.

    On CPU this runs the fused kernel (csrc/cpu/class_similarity_kernel.cpp)
    with its autograd in C++ (csrc/ops/class_similarity.cpp). On CUDA and
    other devices it runs the reference composite
    (`exml_fast.reference.class_similarity`): the op runs once per expert,
    on a GPU it is a few launches of PyTorch's own GEMM and row reductions
    that a kernel of ours would not beat by much, and the composite makes no
    host sync (so it can be captured in a CUDA graph).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"class_similarity: weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"class_similarity: weight must be a 2-D (K, H) classifier weight; got shape {tuple(weight.shape)}"
        )
    check_float_dtype(weight, "weight", "class_similarity")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)):
        raise TypeError(f"class_similarity: floor must be a number in (0, 1]; got {type(floor).__name__}")
    floor = float(floor)
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"class_similarity: floor must be in (0, 1]; got {floor}")
    if weight.device.type == "cpu" and _ext.use_compiled(weight):
        out, _ = torch.ops.exml_fast.class_similarity(weight, floor)
        return out
    return _ref_class_similarity(weight, floor=floor)


def _register() -> None:
    """Fake kernels for the compiled ops (only when _C loaded). Their autograd is in C++
    (csrc/ops/class_similarity.cpp): a Python autograd node would cost more per call than the kernel."""

    @torch.library.register_fake("exml_fast::class_similarity")
    def _class_similarity_fake(weight, floor):
        k = weight.shape[0]
        acc = acc_dtype(weight.dtype)
        return weight.new_empty((k, k), dtype=acc), weight.new_empty((k, k), dtype=acc)

    @torch.library.register_fake("exml_fast::_class_similarity_backward")
    def _class_similarity_backward_fake(grad_out, weight, sim, floor):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)


if _ext.has_ops():
    _register()
