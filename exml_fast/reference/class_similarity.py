"""Reference class similarity of a classifier's weight (Data Impressions, Nayak et al. 2019), in plain PyTorch.

The public formula (rows divided by their norms, a Gram matrix, per-row amin/amax), with the fused op's
conventions for constant rows and zero rows: the test oracle, the benchmark baseline, the fallback when
exml_fast._C is missing, and what `exml_fast.ops.class_similarity` runs on CUDA.
"""

from __future__ import annotations

import torch

from exml_fast._utils.dtypes import acc_dtype

__all__ = ["class_similarity"]


def class_similarity(weight: torch.Tensor, *, floor: float = 1e-4) -> torch.Tensor:
    """(K, K) class similarity of a (K, H) classifier weight; see exml_fast.ops.

    A zero row of `weight` raises on CPU. On other devices it is not checked (that would cost a host
    sync: `exml_fast.ops.class_similarity` runs this function on CUDA): its cosines are 0/0 and, as every
    row's min-max scaling reads its column, the whole output is NaN.
    """
    w = weight.to(acc_dtype(weight.dtype))
    if w.shape[0] == 0:  # no classes: (0, 0), still in w's graph (amin/amax refuse empty rows)
        return w @ w.T
    norms = w.norm(dim=1, keepdim=True)
    if w.device.type == "cpu":
        zero = (norms[:, 0] == 0).nonzero()
        if zero.numel() > 0:
            raise RuntimeError(
                f"class_similarity: row {int(zero[0, 0])} of weight is all zeros: its cosine "
                "similarity to the other classes is undefined (a class with no weight has no direction)"
            )
    n = w / norms
    sim = n @ n.T
    mn = sim.amin(dim=1, keepdim=True)
    mx = sim.amax(dim=1, keepdim=True)
    rng = mx - mn
    constant = rng <= 8 * torch.finfo(sim.dtype).eps
    rng = torch.where(constant, torch.ones_like(rng), rng)  # no 0/0 in the unused branch
    y = ((sim - mn) / rng).clamp_min(floor)
    return torch.where(constant, torch.ones_like(y), y)
