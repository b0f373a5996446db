"""Ex-Model Distillation loss (ExML paper, Eq. 6-10): `ed_loss`, fused.

One kernel per sample builds the distillation target from the expert's and the
previous model's logits, and computes the MSE and cross-entropy partials and
the gradient w.r.t. the student's logits; the backward only scales that saved
gradient by the upstream scalar.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_choice, check_float_dtype, check_tensor
from exml_fast.reference.ed_loss import NORMALIZE_MODES, STANDARDIZE_EPS, TARGET_MODES, acc_dtype
from exml_fast.reference.ed_loss import ed_loss as _ref_ed_loss

__all__ = ["ed_loss", "ed_class_table", "STANDARDIZE_EPS"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# -- class sets -> per-unit table ------------------------------------------------------


def _set_rows(classes: torch.Tensor | None, c: int, device: torch.device):
    """(mask, compact col, full col, units padded to C, count) of one class set, as tensors."""
    ar = torch.arange(c, device=device)
    if classes is None:
        z = torch.zeros(c, dtype=torch.int64, device=device)
        return torch.zeros(c, dtype=torch.bool, device=device), z, z, z, z[:1]
    classes = classes.to(device)
    if classes.dtype == torch.bool:
        m = classes
        # Members first, in ascending unit order (a stable sort keeps the order).
        units = torch.argsort((~m).to(torch.int8), stable=True)
        col_c = torch.where(m, torch.cumsum(m, 0) - 1, 0)
        n = m.sum().reshape(1)
    else:
        idx = classes.long()
        k = idx.shape[0]
        m = torch.zeros(c, dtype=torch.bool, device=device).index_fill(0, idx, True)
        col_c = torch.zeros(c, dtype=torch.int64, device=device).index_copy(
            0, idx, torch.arange(k, device=device))
        units = torch.cat([idx, torch.zeros(c - k, dtype=torch.int64, device=device)])
        n = torch.full((1,), k, dtype=torch.int64, device=device)
    col_f = torch.where(m, ar, units[0])
    return m, col_c, col_f, units, n


def ed_class_table(
    expert_classes: torch.Tensor,
    prev_classes: torch.Tensor | None,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    check: bool = True,
) -> torch.Tensor:
    """The per-unit code the kernels read, built from the two class sets.

    Plain tensor ops (traceable by torch.compile, no host sync) after the
    checks of ``ed_loss`` on the class sets and ``num_classes`` (a host sync;
    ``check=False`` skips them — `ed_loss` validates once and caches the table
    per (class-set tensors, C, device)).

    Returns an int32 tensor of length 2 + 7 C: [|Y^i|, |Y^prev|], then per unit
    its kind (0 none, 1 expert, 2 prev, 3 both), its column in compact and in
    full-width expert / prev logits, and the units of each set in column order
    (layout in csrc/include/exml_fast/ed_loss_common.h).
    """
    if check:
        from exml_fast._utils.checks import check_int

        check_int(num_classes, "num_classes", "ed_class_table", low=1)
        _check_classes(expert_classes, "expert_classes", num_classes)
        if prev_classes is not None:
            _check_classes(prev_classes, "prev_classes", num_classes)
    device = torch.device(device) if device is not None else expert_classes.device
    c = int(num_classes)
    me, ecc, ecf, eu, ne = _set_rows(expert_classes, c, device)
    mp, pcc, pcf, pu, np_ = _set_rows(prev_classes, c, device)
    kind = me.to(torch.int64) + 2 * mp.to(torch.int64)
    return torch.cat([ne, np_, kind, ecc, pcc, ecf, pcf, eu, pu]).to(torch.int32)


def _check_classes(classes, name: str, c: int) -> int:
    """Validates a class set (host sync for an index tensor's values); returns |set|."""
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"ed_loss: {name} must be a (C,) bool mask or a 1-D int64 index tensor; "
                        f"got {type(classes).__name__}")
    if classes.dtype == torch.bool:
        if classes.shape != (c,):
            raise ValueError(f"ed_loss: {name} as a bool mask must have shape ({c},) (one entry "
                             f"per output unit); got {tuple(classes.shape)}")
        n = int(classes.sum())
    elif classes.dtype in _INT_DTYPES:
        if classes.dim() != 1:
            raise ValueError(f"ed_loss: {name} as an index tensor must be 1-D; got shape "
                             f"{tuple(classes.shape)}")
        n = classes.shape[0]
        if n:
            lo, hi = int(classes.min()), int(classes.max())
            if lo < 0 or hi >= c:
                raise ValueError(f"ed_loss: {name} must hold units in [0, {c}); got values in "
                                 f"[{lo}, {hi}]")
            if torch.unique(classes).numel() != n:
                raise ValueError(f"ed_loss: {name} must hold distinct units; got repeats")
    else:
        raise TypeError(f"ed_loss: {name} must be a (C,) bool mask or a 1-D int64 index tensor; "
                        f"got dtype {classes.dtype}")
    if n == 0:
        raise ValueError(f"ed_loss: {name} must name at least one class")
    return n


# (id, version) of the class-set tensors, C, device -> (the tensors, table, |Y^i|, |Y^prev|).
# The tensors are kept alive so their ids cannot be reused while cached.
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 32


def _cached_table(expert_classes, prev_classes, c: int, device: torch.device):
    for name, classes in (("expert_classes", expert_classes), ("prev_classes", prev_classes)):
        if classes is not None and not isinstance(classes, torch.Tensor):
            raise TypeError(f"ed_loss: {name} must be a (C,) bool mask or a 1-D int64 index tensor; "
                            f"got {type(classes).__name__}")
    key = (id(expert_classes), expert_classes._version,
           -1 if prev_classes is None else id(prev_classes),
           -1 if prev_classes is None else prev_classes._version, c, device)
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit[1], hit[2], hit[3]
    ne = _check_classes(expert_classes, "expert_classes", c)
    np_ = 0 if prev_classes is None else _check_classes(prev_classes, "prev_classes", c)
    table = ed_class_table(expert_classes, prev_classes, c, device=device, check=False)
    _TABLE_CACHE[key] = ((expert_classes, prev_classes), table, ne, np_)
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table, ne, np_


# -- the loss -------------------------------------------------------------------------


def _check_teacher(t, name: str, b: int, c: int, n: int | None, device) -> None:
    check_tensor(t, name, "ed_loss")
    check_float_dtype(t, name, "ed_loss")
    width = f"{n} (the size of its class set) or {c}" if n is not None else f"|set| or {c}"
    if t.dim() != 2 or t.shape[0] != b or (n is not None and t.shape[1] not in (n, c)):
        raise ValueError(f"ed_loss: {name} must have shape ({b}, {width}); got "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"ed_loss: {name} is on {t.device} but logits is on {device}")


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
    check_labels: bool = True,
) -> torch.Tensor:
    """Ex-Model Distillation loss, `mse(logits, target) + lambda_ce * CE(logits, labels)`.

    Args:
        logits: (B, C) the student's logits over all C output units; float32,
            float64, float16 or bfloat16. B >= 1.
        labels: (B,) int64 class of each sample, in [0, C).
        expert_logits: the current expert's logits, any float dtype: (B, |Y^i|),
            one column per class of `expert_classes` (ascending unit order for a
            mask, the given order for an index tensor), or (B, C) full width
            (only the set's columns are read). A width equal to C is read as
            full width.
        expert_classes: Y^i, a (C,) bool mask or a 1-D integer index tensor of
            distinct units.
        prev_logits, prev_classes: the previous ex-model's logits and classes
            Y^prev, the same forms; both or neither (first experience).
        target_mode: "slice" (the reference code): the target is zero except on
            Y^i, where it is norm(expert), and on Y^prev, where it is norm(prev);
            units in both get the mean of the two. "per_sample" (the paper,
            Eq. 8): the zero-filled norm(prev) if the label is in Y^prev only,
            the zero-filled norm(expert) if it is in Y^i only, the mean of the
            two if in both; a label in neither is an error.
        normalize: per sample, over each model's own classes: "none"; "center"
            (subtract the mean; the reference code); "standardize"
            ((z - mean) / sqrt(var + 1e-5), biased variance; eps = STANDARDIZE_EPS).
        lambda_ce: weight of the cross-entropy term.
        task_ids, task_heads: the multi-task (MT) form, both or neither:
            task_ids (B,) int64 in [0, T), task_heads (T, C) bool, the units of
            each task's head. A sample then sees only the units of its head H:
            normalisation is over the model's classes within H, the target is
            the one above restricted to H (the expert's logits for a head inside
            Y^i, the previous model's for a head inside Y^prev), the MSE is the
            mean over H, the softmax of the CE is over H and its label must lie
            in H; units outside H get no loss and no gradient. The MSE term is
            then the mean over samples of the per-sample mean over H (equal to
            the mean over all B*C outputs without task heads).
        check_labels: on CUDA with target_mode="per_sample" or task heads,
            validate labels / task_ids values (range, head membership, a source
            model for the label) with one host sync per call; False skips it
            (a label without a source then gets a zero target). With "slice"
            targets and no heads no sync is made: an out-of-range label trips a
            device-side assert, as in F.cross_entropy. CPU kernels always check
            every label, at no extra cost. Skipped under torch.compile.

    Returns:
        A 0-dim tensor, float32 (float64 for float64 logits). Differentiable
        w.r.t. `logits` only: the targets are constants, so expert_logits and
        prev_logits are detached (they get no gradient even if they require
        one), as are labels. The forward saves the (B, C) gradient in logits'
        dtype (the memory of one more logits tensor) and the backward scales it.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"ed_loss: logits must be a torch.Tensor; got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"ed_loss: logits must have shape (B, C) with B, C >= 1; got "
                         f"{tuple(logits.shape)}")
    check_float_dtype(logits, "logits", "ed_loss")
    b, c = logits.shape
    dev = logits.device
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (b,):
        raise ValueError(f"ed_loss: labels must be an int64 tensor of shape ({b},); got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if labels.device != dev:
        raise ValueError(f"ed_loss: labels is on {labels.device} but logits is on {dev}")
    check_choice(target_mode, "target_mode", "ed_loss", TARGET_MODES)
    check_choice(normalize, "normalize", "ed_loss", NORMALIZE_MODES)
    if (prev_logits is None) != (prev_classes is None):
        raise ValueError("ed_loss: prev_logits and prev_classes must be given together "
                         "(both None on the first experience)")
    if (task_ids is None) != (task_heads is None):
        raise ValueError("ed_loss: task_ids and task_heads must be given together")
    compiling = torch.compiler.is_compiling()
    if compiling:
        table, ne, np_ = ed_class_table(expert_classes, prev_classes, c, device=dev, check=False), None, None
    else:
        table, ne, np_ = _cached_table(expert_classes, prev_classes, c, dev)
    _check_teacher(expert_logits, "expert_logits", b, c, ne, dev)
    if prev_logits is not None:
        _check_teacher(prev_logits, "prev_logits", b, c, np_, dev)
    if task_ids is not None:
        if not isinstance(task_ids, torch.Tensor) or task_ids.dtype != torch.int64 \
                or task_ids.shape != (b,):
            raise ValueError(f"ed_loss: task_ids must be an int64 tensor of shape ({b},); got "
                             f"{getattr(task_ids, 'dtype', type(task_ids).__name__)} "
                             f"{tuple(getattr(task_ids, 'shape', ()))}")
        if not isinstance(task_heads, torch.Tensor) or task_heads.dtype != torch.bool \
                or task_heads.dim() != 2 or task_heads.shape[1] != c or task_heads.shape[0] == 0:
            raise ValueError(f"ed_loss: task_heads must be a bool tensor of shape (T, {c}) "
                             f"with T >= 1; got {getattr(task_heads, 'dtype', '')} "
                             f"{tuple(getattr(task_heads, 'shape', ()))}")
        task_ids = task_ids.to(dev)
        task_heads = task_heads.to(dev)
    if not _ext.use_compiled(logits):
        return _ref_ed_loss(
            logits, labels, expert_logits=expert_logits, expert_classes=expert_classes,
            prev_logits=prev_logits, prev_classes=prev_classes, target_mode=target_mode,
            normalize=normalize, lambda_ce=lambda_ce, task_ids=task_ids, task_heads=task_heads)
    if logits.is_cuda and check_labels and not compiling and (
            target_mode == "per_sample" or task_ids is not None):
        _check_labels_cuda(labels, table, c, target_mode, task_ids, task_heads)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    try:
        loss, _ = torch.ops.exml_fast.ed_loss(
            logits, labels, expert_logits.detach(),
            None if prev_logits is None else prev_logits.detach(), table, task_ids, task_heads,
            target_mode, normalize, float(lambda_ce), need_grad)
    except RuntimeError as e:
        if "ed_loss: labels" in str(e) or "task_ids must lie" in str(e):
            raise ValueError(str(e).split("\n")[0]) from None
        raise
    return loss


def _check_labels_cuda(labels, table, c, target_mode, task_ids, task_heads) -> None:
    """Label checks on CUDA, computed on the device and read back with one sync."""
    bad = (labels < 0) | (labels >= c)
    y = labels.clamp(0, c - 1)
    if task_ids is not None:
        t = task_ids.clamp(0, task_heads.shape[0] - 1)
        bad |= (task_ids < 0) | (task_ids >= task_heads.shape[0]) | ~task_heads[t, y]
    if target_mode == "per_sample":
        bad |= table[2:2 + c][y] == 0
    if bool(bad.any()):
        raise ValueError(
            f"ed_loss: labels must lie in [0, {c})"
            + (f", task_ids must lie in [0, {task_heads.shape[0]}) and each label in its "
               "sample's task head" if task_ids is not None else "")
            + (" and, with target_mode='per_sample', in expert_classes or prev_classes"
               if target_mode == "per_sample" else "") + "; some do not")


def _register() -> None:
    """Fake kernels and autograd for the compiled ops (only when _C loaded)."""

    @torch.library.register_fake("exml_fast::ed_loss")
    def _ed_loss_fake(logits, labels, expert_logits, prev_logits, class_table, task_ids,
                      task_heads, target_mode, normalize, lambda_ce, need_grad):
        loss = logits.new_empty((), dtype=acc_dtype(logits.dtype))
        grad = logits.new_empty(tuple(logits.shape) if need_grad else (0,))
        return loss, grad

    @torch.library.register_fake("exml_fast::_ed_loss_backward")
    def _ed_loss_backward_fake(grad, grad_logits):
        return grad_logits.new_empty(grad_logits.shape)

    # The autograd of both ops is registered in C++ (csrc/ops/ed_loss.cpp): a Python register_autograd
    # cost more per call than the fused kernel itself.


if _ext.has_ops():
    _register()
