"""Reference of `bn_match_loss`: the BatchNorm-statistic loss of every layer, one layer at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from exml_fast.reference.bn_stats import BN_LOSS_FORMS


def _layer_parts(mean, var, rm, rv, *, form: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of one layer: the mean part and the variance part of its term (see ``bn_match_loss``)."""
    dm = mean - rm.to(mean.dtype)
    rv = rv.to(var.dtype)
    if form == "l2":
        return torch.linalg.vector_norm(dm), torch.linalg.vector_norm(var - rv)
    if form == "mse":
        return dm.square().mean(), (var - rv).square().mean()
    if form == "sq_std":
        return dm.square().sum(), (torch.sqrt(var + eps) - torch.sqrt(rv + eps)).square().sum()
    raise ValueError(f"bn_match_loss: form must be one of {BN_LOSS_FORMS}; got {form!r}")


def bn_match_loss(
    mean: Sequence[torch.Tensor],
    var: Sequence[torch.Tensor],
    running_mean: Sequence[torch.Tensor],
    running_var: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    eps: Sequence[float],
    form: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_l weight[l] * term_l, terms)``, terms (L, 3) = [a_l, b_l, a_l + b_l] detached.

    Per layer, with d_m = mean - running_mean: "l2" a = ||d_m||, b = ||var - running_var||; "mse" their
    squares' means; "sq_std" a = sum(d_m^2), b = sum((sqrt(var + eps) - sqrt(running_var + eps))^2) —
    each layer's term is ``exml_fast.reference.bn_stats.combine_bn_loss``'s. This is what
    BNStatsMatcher summed layer by layer before the fused op.
    """
    parts = [_layer_parts(m, v, rm, rv, form=form, eps=e)
             for m, v, rm, rv, e in zip(mean, var, running_mean, running_var, eps)]
    total = None
    for w, (a, b) in zip(weight, parts):
        t = (a + b) * w if w != 1.0 else a + b
        total = t if total is None else total + t
    terms = torch.stack([torch.stack([a, b, a + b]) for a, b in parts]).detach()
    return total, terms
