"""Reference row-wise distillation losses over logits, in plain PyTorch.

- `soft_target_cross_entropy`: Data Impressions' inversion loss (and soft-label
  KD): `-(t * log_softmax(z / tau)).sum(1)`, reduced over rows.
- `kd_loss`: Hinton KD, `kl_div(log_softmax(s / tau), softmax(t / tau),
  reduction="batchmean") * tau**2`.
- `js_divergence`: Adaptive DeepInversion's competition term: the public code's
  sequence (softmax, mixture from the un-clamped probabilities, clamp of P, Q
  and M, two `KLDivLoss(reduction="batchmean")`), with the KL arguments of
  the Jensen-Shannon divergence the paper defines, `KL(P || M)` and `KL(Q || M)`
  (form "js"); form "public" keeps the public code's order, `KL(M || P)` and
  `KL(M || Q)`.

They run in the input dtype (as the public code did) and return the input
dtype, like the fused ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
#: Forms of `js_divergence`: "js", the Jensen-Shannon divergence (the ADI paper's, and the fused op's);
#: "public", the public ADI code's `0.5 KL(M || P) + 0.5 KL(M || Q)`.
JS_FORMS = ("js", "public")


def soft_target_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per row `-sum_k t_k log softmax(z / temperature)_k`; "mean" over rows, "sum" or "none"."""
    per_row = -(target_probs * F.log_softmax(logits / temperature, dim=1)).sum(dim=1)
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """`tau^2 * KL(softmax(t / tau) || softmax(s / tau))`, averaged over rows."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
        )
        * temperature**2
    )


def js_divergence(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    *,
    temperature: float = 1.0,
    clamp: tuple[float, float] = (0.0, 1.0),
    form: str = "js",
) -> torch.Tensor:
    """Jensen-Shannon divergence of softmax(a / tau) and softmax(b / tau), batchmean.

    As in the Adaptive DeepInversion code, M is formed from the un-clamped P and
    Q, then P, Q and M are each clamped to `clamp`. Form "js":
    `0.5 KL(P || M) + 0.5 KL(Q || M)` (the divergence the paper names); form
    "public": `0.5 KL(M || P) + 0.5 KL(M || Q)`, what the public code computes
    (`KLDivLoss()(log P, M)` is `KL(M || P)`).
    """
    lo, hi = clamp
    p = F.softmax(logits_a / temperature, dim=1)
    q = F.softmax(logits_b / temperature, dim=1)
    m = 0.5 * (p + q)
    p = torch.clamp(p, lo, hi)
    q = torch.clamp(q, lo, hi)
    m = torch.clamp(m, lo, hi)
    if form == "public":
        return 0.5 * F.kl_div(torch.log(p), m, reduction="batchmean") + 0.5 * F.kl_div(
            torch.log(q), m, reduction="batchmean"
        )
    if form != "js":
        raise ValueError(f"js_divergence: form must be one of {JS_FORMS}; got {form!r}")
    log_m = torch.log(m)
    return 0.5 * F.kl_div(log_m, p, reduction="batchmean") + 0.5 * F.kl_div(
        log_m, q, reduction="batchmean"
    )
