"""The loss terms that train a generator against a frozen teacher (SKD, DAFL, DFAD), in plain PyTorch.

Each takes logits (N, K) or penultimate features (N, D) and returns a
scalar; all are means over the batch, so their scale does not depend on N.

- :func:`feature_cosine_discrepancy` — SKD's ψ (Eq. 1): ``1 − cos(nor(F_T), nor(F_S))``.
- :func:`category_loss` — SKD's L_cat (Eq. 4–5) = DAFL's one-hot loss: CE against the argmax.
- :func:`diversity_loss` — SKD's L_div (Eq. 6) = DAFL's information entropy (natural log; DAFL's
  code uses log10, i.e. this times 1/ln 10): ``Σ_k w_k log w_k`` of the batch-mean softmax.
- :func:`activation_loss` — DAFL's feature activation term: ``−mean |F_T|``.
- :func:`logit_l1` — DFAD's adversarial term: ``mean |z_T − z_S|`` (the generator maximises it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exml_fast._utils.checks import check_tensor

__all__ = ["activation_loss", "category_loss", "diversity_loss", "feature_cosine_discrepancy", "logit_l1"]


def _check_2d(x, name: str, owner: str) -> None:
    check_tensor(x, name, owner)
    if x.dim() != 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise ValueError(f"{owner}: {name} must be a non-empty floating-point (N, K) tensor; got "
                         f"{x.dtype} {tuple(x.shape)}")


def _check_pair(a, b, owner: str) -> None:
    _check_2d(a, "the first tensor", owner)
    _check_2d(b, "the second tensor", owner)
    if a.shape != b.shape:
        raise ValueError(f"{owner}: both tensors must have one shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def feature_cosine_discrepancy(f_teacher: torch.Tensor, f_student: torch.Tensor) -> torch.Tensor:
    """SKD's ψ (Eq. 1), averaged over the batch: ``mean_i [1 − cos(f_teacher_i, f_student_i)]``.

    Rows are L2-normalised first (``nor``; a zero row stays zero, so its cosine is 0 and its term 1).
    In [0, 2]; 0 when every pair of rows points the same way.
    """
    _check_pair(f_teacher, f_student, "feature_cosine_discrepancy")
    cos = (F.normalize(f_teacher, dim=1) * F.normalize(f_student, dim=1)).sum(1)
    return (1.0 - cos).mean()


def category_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, K) against their own argmax (SKD Eq. 4–5, DAFL's one-hot loss)."""
    _check_2d(logits, "logits", "category_loss")
    return F.cross_entropy(logits, logits.detach().argmax(1))


def diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    """``Σ_k w_k log w_k`` with ``w`` the batch mean of ``softmax(logits)`` (SKD Eq. 6): the negative
    entropy of the batch's class distribution, minimal (−log K) when every class is equally likely."""
    _check_2d(logits, "logits", "diversity_loss")
    w = torch.softmax(logits, dim=1).mean(0)
    return (w * torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))).sum()


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation term: ``−mean |features|`` (large penultimate activations are rewarded)."""
    _check_2d(features, "features", "activation_loss")
    return -features.abs().mean()


def logit_l1(logits_teacher: torch.Tensor, logits_student: torch.Tensor) -> torch.Tensor:
    """DFAD's discrepancy: the mean absolute difference of the two models' logits."""
    _check_pair(logits_teacher, logits_student, "logit_l1")
    return (logits_teacher - logits_student).abs().mean()
