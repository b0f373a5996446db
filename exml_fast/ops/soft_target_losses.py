"""Fused row-wise distillation losses over logits.

- `soft_target_cross_entropy` — Data Impressions' inversion loss / soft-label KD.
- `kd_loss` — Hinton knowledge distillation, `tau^2 * KL(teacher || student)`.
- `js_divergence` — Adaptive DeepInversion's teacher-student competition term
  (the Jensen-Shannon divergence; ``form="public"``: the public code's variant).

Each is one fused kernel forward (one read of each row: online max and
log-sum-exp in fp32, fp64 for fp64 logits) and one backward, on CPU and CUDA.
Outputs (losses and gradients) come back in the logits' dtype, like
`F.cross_entropy`. Under `torch.autocast` they follow PyTorch's losses
(autocast's float32 list): 16-bit logits and targets are taken in float32,
so 16-bit logits may meet float32 targets there, and the loss is float32.
The autograd is registered in C++ (cheaper per call than a
Python autograd function, which matters at these small sizes); the fake
kernels below make the ops traceable by `torch.compile`. First derivatives
only: double backward raises.
"""

from __future__ import annotations

import math

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_choice, check_float_dtype, check_tensor
from exml_fast._utils.dtypes import acc_dtype, autocast_to_float32
from exml_fast.reference import soft_target_losses as _ref
from exml_fast.reference.soft_target_losses import JS_FORMS, REDUCTIONS

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction's values


def _check_logits(x, op: str, name: str) -> None:
    check_tensor(x, name, op)
    if x.dim() != 2:
        raise ValueError(
            f"{op}: {name} must have shape (B, K) (rows of logits over K classes); "
            f"got {x.dim()} dims with shape {tuple(x.shape)}"
        )
    check_float_dtype(x, name, op)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: {name} must have at least one class (K >= 1); got shape {tuple(x.shape)}")


def _check_pair(a, b, op: str, name_a: str, name_b: str) -> None:
    _check_logits(a, op, name_a)
    _check_logits(b, op, name_b)
    if a.shape != b.shape:
        raise ValueError(
            f"{op}: {name_a} and {name_b} must have the same shape; got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{op}: {name_a} and {name_b} must have the same dtype; got {a.dtype} and "
            f"{b.dtype} (convert one with .to())"
        )
    if a.device != b.device:
        raise ValueError(
            f"{op}: {name_a} and {name_b} must be on the same device; got {a.device} and {b.device}"
        )


def _check_temperature(temperature, op: str) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a real number > 0; got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"{op}: temperature must be a finite number > 0; got {temperature}")
    return temperature


def soft_target_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of soft targets: per row `-sum_k t_k log softmax(z / temperature)_k`.

    The Data Impressions inversion loss (targets drawn from a Dirichlet) and
    soft-label distillation. Targets are used as given: they need not sum to 1
    and are not renormalised.

    Args:
        logits: (B, K) floating; B may be 0. Rows may have any stride (a last dim
            that is not unit-stride is copied once).
        target_probs: (B, K), same dtype and device as logits.
        temperature: > 0; logits are divided by it.
        reduction: "mean" (over rows), "sum" or "none".

    Returns:
        () for "mean"/"sum" ("mean" of B = 0 rows is NaN, as in torch), (B,) for
        "none"; in the logits' dtype (accumulated in fp32, fp64 for fp64).
        Differentiable w.r.t. logits and target_probs (once).
    """
    op = "soft_target_cross_entropy"
    logits, target_probs = autocast_to_float32(logits, target_probs)
    _check_pair(logits, target_probs, op, "logits", "target_probs")
    temperature = _check_temperature(temperature, op)
    code = _REDUCTION_CODES.get(reduction) if isinstance(reduction, str) else None
    if code is None:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if _ext.use_compiled(logits, target_probs):
        return torch.ops.exml_fast.soft_target_cross_entropy(logits, target_probs, temperature, code)[0]
    return _ref.soft_target_cross_entropy(
        logits, target_probs, temperature=temperature, reduction=reduction
    )


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Knowledge-distillation loss with the usual temperature-squared scaling.

    Equal to `F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1),
    reduction="batchmean") * T**2`: `T^2 * KL(softmax(t / T) || softmax(s / T))`
    averaged over rows.

    Args:
        student_logits, teacher_logits: (B, K) floating, same dtype and device.
        temperature: > 0.

    Returns:
        A scalar in the logits' dtype (NaN for B = 0). Differentiable w.r.t. the
        student logits and, when it requires grad, the teacher logits (once).
    """
    op = "kd_loss"
    student_logits, teacher_logits = autocast_to_float32(student_logits, teacher_logits)
    _check_pair(student_logits, teacher_logits, op, "student_logits", "teacher_logits")
    temperature = _check_temperature(temperature, op)
    if _ext.use_compiled(student_logits, teacher_logits):
        return torch.ops.exml_fast.kd_loss(student_logits, teacher_logits, temperature)[0]
    return _ref.kd_loss(student_logits, teacher_logits, temperature=temperature)


def js_divergence(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    *,
    temperature: float = 1.0,
    clamp: tuple[float, float] = (0.0, 1.0),
    form: str = "js",
) -> torch.Tensor:
    """Jensen-Shannon divergence of two softmax distributions, Adaptive DeepInversion's term.

    With P = softmax(a / T), Q = softmax(b / T) and M = (P + Q) / 2 formed from
    the un-clamped P and Q, each of P, Q and M is clamped to `clamp` = (lo, hi)
    (as the public ADI code does) and `JS = 0.5 KL(P || M) + 0.5 KL(Q || M)`,
    `KL(P || M) = sum_k P_k (log P_k - log M_k)`, averaged over rows: the true
    Jensen-Shannon divergence, which the ADI paper's competition term
    `1 - JS` names. The public code used T = 3, clamp (0.01, 0.99), and
    computed `0.5 KL(M || P) + 0.5 KL(M || Q)` instead (its
    `KLDivLoss()(log P, M)` is `KL(M || P)`): that is `form="public"`.
    Gradients pass through a clamp only inside [lo, hi] (torch.clamp's rule).

    With lo = 0 a probability can underflow to 0: its terms count as 0 (0 log 0
    = 0, as torch's KLDivLoss does for a zero target) and so do their gradients.
    Where P_k and Q_k both underflow, M_k = 0 too and the fused op still gives 0
    for the element, while the reference (log of M = 0) gives NaN.

    Args:
        logits_a, logits_b: (B, K) floating, same dtype and device.
        temperature: > 0.
        clamp: (lo, hi) with 0 <= lo < hi <= 1.
        form: "js" (the default: the divergence above, one fused kernel) or
            "public" (the public code's argument order; plain PyTorch, the
            reference's, on every device).

    Returns:
        A scalar in the logits' dtype (NaN for B = 0), differentiable w.r.t.
        both logits (once for "js").
    """
    op = "js_divergence"
    logits_a, logits_b = autocast_to_float32(logits_a, logits_b)
    _check_pair(logits_a, logits_b, op, "logits_a", "logits_b")
    temperature = _check_temperature(temperature, op)
    try:
        lo, hi = (float(c) for c in clamp)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: clamp must be a pair (lo, hi) of numbers; got {clamp!r}") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"{op}: clamp must satisfy 0 <= lo < hi <= 1; got ({lo}, {hi})")
    check_choice(form, "form", op, JS_FORMS)
    if form == "public":
        return _ref.js_divergence(logits_a, logits_b, temperature=temperature, clamp=(lo, hi), form=form)
    if _ext.use_compiled(logits_a, logits_b):
        return torch.ops.exml_fast.js_divergence(logits_a, logits_b, temperature, lo, hi)[0]
    return _ref.js_divergence(logits_a, logits_b, temperature=temperature, clamp=(lo, hi))


def _register() -> None:
    """Fake kernels of the compiled ops (only when _C loaded); their autograd is in C++."""

    def loss_and_saved(x, reduction, cols):
        b = x.shape[0]
        loss = x.new_empty((b,)) if reduction == 0 else x.new_empty(())
        return loss, x.new_empty((b, cols), dtype=acc_dtype(x.dtype))

    def grad_pair(a, b, need_b):
        return a.new_empty(a.shape), b.new_empty(b.shape if need_b else (0, 0))

    @torch.library.register_fake("exml_fast::soft_target_cross_entropy")
    def _soft_ce_fake(logits, target_probs, temperature, reduction):
        return loss_and_saved(logits, reduction, 2)

    @torch.library.register_fake("exml_fast::_soft_target_cross_entropy_backward")
    def _soft_ce_backward_fake(grad, logits, target_probs, saved, temperature, reduction,
                               target_grad):
        return grad_pair(logits, target_probs, target_grad)

    @torch.library.register_fake("exml_fast::kd_loss")
    def _kd_fake(student_logits, teacher_logits, temperature, save_grad=False):
        loss, saved = loss_and_saved(student_logits, 1, 3)
        # The student's gradient factor (softmax(s/T) - softmax(t/T)), (0, 0) when not saved.
        factor = student_logits.new_empty(student_logits.shape if save_grad else (0, 0),
                                          dtype=acc_dtype(student_logits.dtype))
        return loss, saved, factor

    @torch.library.register_fake("exml_fast::_kd_loss_backward")
    def _kd_backward_fake(grad, student_logits, teacher_logits, saved, temperature, teacher_grad,
                          grad_factor=None):
        return grad_pair(student_logits, teacher_logits, teacher_grad)

    @torch.library.register_fake("exml_fast::js_divergence")
    def _js_fake(logits_a, logits_b, temperature, lo, hi):
        return loss_and_saved(logits_a, 1, 2)

    @torch.library.register_fake("exml_fast::_js_divergence_backward")
    def _js_backward_fake(grad, logits_a, logits_b, saved, temperature, lo, hi):
        return grad_pair(logits_a, logits_b, True)


if _ext.has_ops():
    _register()
