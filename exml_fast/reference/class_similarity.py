"""Reference class similarity of a classifier's weight (Data Impressions, Nayak et al. 2019), in plain PyTorch.

The public formula (F.normalize, a Gram matrix, per-row amin/amax), with the fused op's conventions for constant
rows and zero rows: the test oracle, the benchmark baseline and the fallback when exml_fast._C is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exml_fast._utils.dtypes import acc_dtype

__all__ = ["class_similarity"]


def class_similarity(weight: torch.Tensor, *, floor: float = 1e-4) -> torch.Tensor:
    """(K, K) class similarity of a (K, H) classifier weight; see exml_fast.ops."""
    w = weight.to(acc_dtype(weight.dtype))
    norms = w.norm(dim=1)
    zero = (norms == 0).nonzero()
    if zero.numel() > 0:
        raise RuntimeError(
            f"class_similarity: row {int(zero[0, 0])} of weight is all zeros: its cosine "
            "similarity to the other classes is undefined (a class with no weight has no direction)"
        )
    n = F.normalize(w, dim=1)
    sim = n @ n.T
    mn = sim.amin(dim=1, keepdim=True)
    mx = sim.amax(dim=1, keepdim=True)
    rng = mx - mn
    constant = rng <= 8 * torch.finfo(sim.dtype).eps
    rng = torch.where(constant, torch.ones_like(rng), rng)  # no 0/0 in the unused branch
    y = ((sim - mn) / rng).clamp_min(floor)
    return torch.where(constant, torch.ones_like(y), y)
