"""`bn_match_loss`: the BatchNorm-statistic loss of every layer of a model in one op."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_choice
from exml_fast.reference.bn_match_loss import bn_match_loss as _ref_bn_match_loss
from exml_fast.reference.bn_stats import BN_LOSS_FORMS

__all__ = ["bn_match_loss"]

_OP = "bn_match_loss"


def _as_list(value, name: str, n: int, *, kind: type) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{_OP}: {name} must have one entry per layer ({n}); got {len(value)}")
        return list(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n
    raise TypeError(f"{_OP}: {name} must be a list of {n} {kind.__name__}s"
                    f"{' or one number' if kind is float else ''}; got {type(value).__name__}")


def bn_match_loss(
    mean: Sequence[torch.Tensor],
    var: Sequence[torch.Tensor],
    running_mean: Sequence[torch.Tensor],
    running_var: Sequence[torch.Tensor],
    *,
    weight: Sequence[float] | float = 1.0,
    eps: Sequence[float] | float = 1e-5,
    form: str = "l2",
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sum_l weight[l] * bn_stats_loss`` term of layer l, from the layers' statistics, in one op.

    Layer l's term is the distance between its batch statistics ``(mean[l], var[l])`` (``bn_stats`` of the
    layer's input) and its running ones, as :func:`exml_fast.ops.bn_stats_loss` defines it for each
    ``form``: "l2" ``||mean - rm|| + ||var - rv||`` (DeepInversion), "mse", or "sq_std" (the ExML paper;
    ``eps[l]`` under its square roots). One op forward and one backward whatever the number of layers:
    on a GPU two kernel launches forward and one backward for up to 48 layers, where forming the terms
    layer by layer costs about a dozen launches and autograd nodes per layer.

    Args:
        mean, var: one (C_l,) tensor per layer, float32 (float64 for float64 activations), on one device;
            differentiable.
        running_mean, running_var: the layers' running statistics, (C_l,) each, on that device; cast to
            the statistics' dtype; they get no gradient.
        weight: one weight per layer (DeepInversion weights the first layer by ``first_bn_multiplier``), or
            one number for all.
        eps: one eps per layer (each BatchNorm's own), or one number for all; used by "sq_std".
        form: "l2", "mse" or "sq_std".
        return_terms: also return the unweighted per-layer terms, an (L, 3) tensor of rows
            ``[mean part, variance part, term]``, detached.

    Returns:
        The loss, a 0-dim tensor of the statistics' dtype (and the terms with ``return_terms``).
        Differentiable once with respect to ``mean`` and ``var``.
    """
    check_choice(form, "form", _OP, BN_LOSS_FORMS)
    lists = {"mean": mean, "var": var, "running_mean": running_mean, "running_var": running_var}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in value):
            raise TypeError(f"{_OP}: {name} must be a list of tensors, one per layer; got {type(value).__name__}")
    n = len(mean)
    if n == 0:
        raise ValueError(f"{_OP}: mean must hold at least one layer's statistics; got an empty list")
    for name, value in lists.items():
        if len(value) != n:
            raise ValueError(f"{_OP}: {name} must have one tensor per layer ({n}, as mean); got {len(value)}")
    weight = _as_list(weight, "weight", n, kind=float)
    eps = _as_list(eps, "eps", n, kind=float)
    dtype = mean[0].dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_OP}: mean must be float32 or float64 (bn_stats' output dtypes); got {dtype}")
    rm = [t if t.dtype == dtype else t.to(dtype) for t in running_mean]
    rv = [t if t.dtype == dtype else t.to(dtype) for t in running_var]
    if _ext.use_compiled(mean[0]):
        loss, terms = torch.ops.exml_fast.bn_match_loss(list(mean), list(var), rm, rv, weight, eps,
                                                        BN_LOSS_FORMS.index(form))
    else:
        loss, terms = _ref_bn_match_loss(mean, var, rm, rv, weight=weight, eps=eps, form=form)
    return (loss, terms) if return_terms else loss


def _register() -> None:
    """Fake kernels of the compiled ops (only when _C loaded); the autograd is in C++
    (csrc/ops/bn_match_loss.cpp)."""

    @torch.library.register_fake("exml_fast::bn_match_loss")
    def _fake(mean, var, running_mean, running_var, weight, eps, form):
        return mean[0].new_empty(()), mean[0].new_empty((len(mean), 3))

    @torch.library.register_fake("exml_fast::_bn_match_loss_backward")
    def _backward_fake(grad, mean, var, running_mean, running_var, weight, eps, form, terms):
        total = sum(m.shape[0] for m in mean)
        return mean[0].new_empty((2 * total,))


if _ext.has_ops():
    _register()
