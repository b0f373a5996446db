"""Reference Ex-Model Distillation loss (ExML paper, Eq. 6-10), in plain PyTorch.

Written as the public code would: slice the expert's / previous model's
logits, normalise each block, scatter them into a zero target, then
`F.mse_loss + lambda_ce * F.cross_entropy`. The multi-task (MT) form uses
(B, C) masks. It is the test oracle, the benchmark baseline and the fallback
of exml_fast.ops.ed_loss; see that function for the full semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exml_fast._utils.dtypes import acc_dtype

TARGET_MODES = ("slice", "per_sample")
NORMALIZE_MODES = ("none", "center", "standardize")
STANDARDIZE_EPS = 1e-5



def class_index(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A class set as an int64 index tensor: a (C,) bool mask becomes its units in
    ascending order; an index tensor is returned as given (its order is the
    column order of compact logits)."""
    if classes.dtype == torch.bool:
        return classes.nonzero().flatten()
    return classes.long()


def normalize_block(z: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample normalisation of a (B, K) block of logits over its K columns."""
    if mode == "none":
        return z
    mean = z.mean(1, keepdim=True)
    if mode == "center":
        return z - mean
    if mode == "standardize":
        var = z.var(1, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + STANDARDIZE_EPS)
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}; got {mode!r}")


def _block(logits_t: torch.Tensor, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The (B, K) columns of a teacher's logits for the set `idx` (compact or full width)."""
    if logits_t.shape[1] == num_classes:
        return logits_t[:, idx]
    return logits_t


def ed_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    expert_logits: torch.Tensor,
    expert_classes: torch.Tensor,
    prev_logits: torch.Tensor | None = None,
    prev_classes: torch.Tensor | None = None,
    target_mode: str = "slice",
    normalize: str = "center",
    lambda_ce: float = 1.0,
    task_ids: torch.Tensor | None = None,
    task_heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mse(logits, target) + lambda_ce * cross_entropy(logits, labels)`; see
    exml_fast.ops.ed_loss. Targets are detached. Returns a scalar of the
    accumulation dtype (fp32, fp64 for fp64 logits)."""
    if target_mode not in TARGET_MODES:
        raise ValueError(f"target_mode must be one of {TARGET_MODES}; got {target_mode!r}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}; got {normalize!r}")
    if (task_ids is None) != (task_heads is None):
        raise ValueError("task_ids and task_heads must be given together")
    c = logits.shape[1]
    acc = acc_dtype(logits.dtype)
    eidx = class_index(expert_classes, c).to(logits.device)
    e = _block(expert_logits.detach(), eidx, c).to(logits.dtype)
    has_prev = prev_logits is not None
    if has_prev:
        pidx = class_index(prev_classes, c).to(logits.device)
        p = _block(prev_logits.detach(), pidx, c).to(logits.dtype)
    if task_ids is not None:
        return _ed_loss_mt(logits, labels, e, eidx, p if has_prev else None,
                           pidx if has_prev else None, target_mode, normalize, lambda_ce,
                           task_ids, task_heads).to(acc)

    ye = normalize_block(e, normalize)
    in_e = torch.zeros(c, dtype=torch.bool, device=logits.device)
    in_e[eidx] = True
    in_p = torch.zeros_like(in_e)
    if has_prev:
        yp = normalize_block(p, normalize)
        in_p[pidx] = True
    if target_mode == "slice":
        target = torch.zeros_like(logits)
        target[:, eidx] = ye
        if has_prev:
            # Units in both sets get the mean: add the blocks, halve those columns
            # (a (C,) weight rather than a data-dependent branch, so it compiles).
            target[:, pidx] += yp
            target = target * (1.0 / (in_e.to(logits.dtype) + in_p.to(logits.dtype)).clamp(min=1))
    else:
        te = torch.zeros_like(logits)
        te[:, eidx] = ye
        tp = torch.zeros_like(logits)
        if has_prev:
            tp[:, pidx] = yp
        le, lp = in_e[labels], in_p[labels]
        if not bool((le | lp).all()):
            raise ValueError("labels: with target_mode='per_sample' every label must be in "
                             "expert_classes or prev_classes")
        target = torch.where((le & lp)[:, None], (te + tp) / 2,
                             torch.where(le[:, None], te, tp))
    loss = F.mse_loss(logits, target) + lambda_ce * F.cross_entropy(logits, labels)
    return loss.to(acc)


def _ed_loss_mt(logits, labels, e, eidx, p, pidx, target_mode, normalize, lambda_ce,
                task_ids, task_heads):
    """Multi-task form with (B, C) masks: the units of a sample's head are the only
    ones it sees (normalisation, target, MSE and softmax)."""
    b, c = logits.shape
    head = task_heads.to(logits.device)[task_ids]  # (B, C)
    if not bool(head[torch.arange(b, device=logits.device), labels].all()):
        raise ValueError("labels: every label must be a unit of its sample's task head")

    def blocks(vals, idx):
        full = torch.zeros_like(logits)
        full[:, idx] = vals
        in_set = torch.zeros(c, dtype=torch.bool, device=logits.device)
        in_set[idx] = True
        m = head & in_set  # (B, C)
        mf = m.to(logits.dtype)
        n = mf.sum(1, keepdim=True).clamp(min=1)
        if normalize == "none":
            y = full
        else:
            mean = (full * mf).sum(1, keepdim=True) / n
            y = full - mean
            if normalize == "standardize":
                var = (y.square() * mf).sum(1, keepdim=True) / n
                y = y / torch.sqrt(var + STANDARDIZE_EPS)
        return y * mf, m

    ye, me = blocks(e, eidx)
    if p is not None:
        yp, mp = blocks(p, pidx)
    else:
        yp, mp = torch.zeros_like(logits), torch.zeros_like(head)
    if target_mode == "slice":
        target = torch.where(me & mp, (ye + yp) / 2, ye + yp)
    else:
        rows = torch.arange(b, device=logits.device)
        le, lp = me[rows, labels], mp[rows, labels]
        if not bool((le | lp).all()):
            raise ValueError("labels: with target_mode='per_sample' every label must be in "
                             "expert_classes or prev_classes")
        target = torch.where((le & lp)[:, None], (ye + yp) / 2,
                             torch.where(le[:, None], ye, yp))
    hf = head.to(logits.dtype)
    mse = (((logits - target).square() * hf).sum(1) / hf.sum(1)).mean()
    masked = logits.masked_fill(~head, float("-inf"))
    return mse + lambda_ce * F.cross_entropy(masked, labels)
