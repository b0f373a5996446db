"""Reference Data-Impression soft targets (Nayak et al. 2019), in plain PyTorch.

`dirichlet_targets` is `torch._sample_dirichlet` (what
`torch.distributions.Dirichlet(concentration).sample()` calls) with the
generator: the test oracle, the benchmark baseline and the fallback when
exml_fast._C is missing. The class similarity it is fed from is
:mod:`exml_fast.reference.class_similarity`.
"""

from __future__ import annotations

import torch



def dirichlet_targets(
    concentration: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One Dirichlet sample per row of (B, K) `concentration`, float32 (B, K)."""
    conc = concentration.detach()
    if conc.dtype not in (torch.float32, torch.float64):
        conc = conc.float()
    if generator is None:
        out = torch._sample_dirichlet(conc)
    else:
        out = torch._sample_dirichlet(conc, generator=generator)
    return out.float()
