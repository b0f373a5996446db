"""exml_fast.ops.ed_loss (Ex-Model Distillation loss) against the reference.

The reference (exml_fast.reference.ed_loss) is itself checked against a
per-sample loop that spells out the documented semantics. Tolerances: the
truth is the reference in float64 on the same input values; in each dtype the
fused op must be at least as accurate as PyTorch's own computation in that
dtype (the reference run in that dtype), up to a factor of 2 plus a few units
of rounding of the accumulation dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _util import DEVICES, DTYPES, acc_dtype, eps_of, requires_ops

from exml_fast.ops.ed_loss import ed_class_table, ed_loss
from exml_fast.reference.ed_loss import STANDARDIZE_EPS
from exml_fast.reference.ed_loss import ed_loss as ref_ed_loss

MODES = ["slice", "per_sample"]
NORMS = ["none", "center", "standardize"]


# -- inputs ---------------------------------------------------------------------------


def _mask(c, units):
    m = torch.zeros(c, dtype=torch.bool)
    m[list(units)] = True
    return m


def make_case(name: str, dtype=torch.float32, device="cpu", seed=0):
    """kwargs of ed_loss (without target_mode / normalize) for a named case."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=2.0):
        return torch.randn(*shape, generator=g) * scale

    b, c = 7, 10
    eset, pset = torch.arange(5, 10), torch.arange(0, 5)
    ewidth = pwidth = "full"
    extra = {}
    heads = tids = None
    if name == "split":
        pass
    elif name == "compact":
        ewidth = pwidth = "compact"
    elif name == "overlap_mask":  # masks, overlapping sets, compact logits
        eset, pset = _mask(c, range(3, 10)), _mask(c, range(0, 6))
        ewidth = pwidth = "compact"
    elif name == "permuted_index":  # index tensors in a non-ascending order
        eset, pset = torch.tensor([9, 4, 7, 5]), torch.tensor([2, 0, 8, 1, 3, 6])
        ewidth, pwidth = "compact", "full"
    elif name == "no_prev":
        eset, pset = torch.arange(0, 10), None
    elif name == "gaps":  # units in neither set (zero target)
        eset, pset = torch.tensor([1, 3, 8]), torch.tensor([0, 2, 5, 6])
    elif name == "batch1":
        b = 1
    elif name == "one_class":
        b, c = 5, 1
        eset, pset = torch.tensor([0]), None
    elif name == "large_c":  # vector loops plus tails
        b, c = 5, 1003
        eset, pset = torch.arange(900, 1003), torch.arange(0, 950)
    elif name == "large_c_compact":
        b, c = 4, 517
        eset, pset = torch.arange(400, 517), _mask(517, range(0, 400))
        ewidth = pwidth = "compact"
    elif name == "noncontig":
        b, c = 6, 13
        eset, pset = torch.arange(6, 13), torch.arange(0, 8)
        extra["noncontig"] = True
        pwidth = "compact"
    elif name == "mt":  # multi-task: 3 heads
        b, c = 9, 10
        eset, pset = torch.arange(6, 10), torch.arange(0, 6)
        heads = torch.zeros(3, c, dtype=torch.bool)
        heads[0, 0:3] = heads[1, 3:6] = heads[2, 6:10] = True
        tids = torch.randint(0, 3, (b,), generator=g)
    elif name == "mt_overlap":  # a head straddling both sets, overlapping sets
        b, c = 8, 12
        eset, pset = _mask(c, range(5, 12)), torch.arange(0, 8)
        heads = torch.zeros(2, c, dtype=torch.bool)
        heads[0, 0:6] = heads[1, 4:12] = True
        tids = torch.randint(0, 2, (b,), generator=g)
        ewidth = "compact"
    else:
        raise KeyError(name)

    def idx(s):
        return s.nonzero().flatten() if s.dtype == torch.bool else s

    def teacher(s, width):
        full = randn(b, c, scale=3.0) + 1.5
        if extra.get("noncontig"):  # a column-strided view
            full = torch.stack([full, full], 2).flatten(1)[:, ::2]
            return (full if width == "full" else full[:, idx(s)]).to(dtype)
        return (full if width == "full" else full[:, idx(s)].contiguous()).to(dtype)

    logits = randn(b, c)
    if extra.get("noncontig"):
        logits = randn(b, 2 * c)[:, ::2]  # column stride 2
    # Labels in the sets (per_sample) and in the sample's head (MT).
    union = _union(eset, pset, c)
    if heads is not None:
        labels = torch.stack([
            (heads[t] & union).nonzero().flatten()[
                torch.randint(0, int((heads[t] & union).sum()), (1,), generator=g)][0]
            for t in tids])
    else:
        cand = union.nonzero().flatten()
        labels = cand[torch.randint(0, cand.numel(), (b,), generator=g)]
    # Teachers in logits' dtype (the kernels read them without a conversion).
    kw = dict(expert_logits=teacher(eset, ewidth).to(device), expert_classes=eset)
    if pset is not None:
        kw.update(prev_logits=teacher(pset, pwidth).to(device), prev_classes=pset)
    if heads is not None:
        kw.update(task_ids=tids.to(device), task_heads=heads.to(device))
    logits = logits.to(dtype).to(device)
    return logits, labels.to(device), kw


def _union(eset, pset, c):
    u = torch.zeros(c, dtype=torch.bool)
    for s in (eset, pset):
        if s is None:
            continue
        if s.dtype == torch.bool:
            u |= s
        else:
            u[s] = True
    return u


CASES = ["split", "compact", "overlap_mask", "permuted_index", "no_prev", "gaps", "batch1",
         "one_class", "large_c", "large_c_compact", "noncontig", "mt", "mt_overlap"]


# -- an independent spelling-out of the semantics ----------------------------------------


def loop_oracle(logits, labels, *, expert_logits, expert_classes, prev_logits=None,
                prev_classes=None, target_mode, normalize, lambda_ce=1.0, task_ids=None,
                task_heads=None):
    z = logits.detach().double().cpu()
    b, c = z.shape

    def members(classes):  # unit -> column of compact logits, in column order
        if classes.dtype == torch.bool:
            units = classes.nonzero().flatten().tolist()
        else:
            units = classes.tolist()
        return units

    sets = [(expert_logits.double().cpu(), members(expert_classes))]
    if prev_logits is not None:
        sets.append((prev_logits.double().cpu(), members(prev_classes)))
    total_mse = total_ce = 0.0
    for r in range(b):
        active = list(range(c)) if task_ids is None else \
            task_heads[int(task_ids[r])].nonzero().flatten().tolist()
        normed = []  # per model: {unit: normalised value}
        for t, units in sets:
            full = t.shape[1] == c
            vals = {u: float(t[r, u if full else j]) for j, u in enumerate(units) if u in active}
            if vals and normalize != "none":
                xs = torch.tensor(list(vals.values()), dtype=torch.float64)
                mean = xs.mean()
                scale = 1.0 if normalize == "center" else \
                    1.0 / float(torch.sqrt(xs.var(unbiased=False) + STANDARDIZE_EPS))
                vals = {u: (v - float(mean)) * scale for u, v in vals.items()}
            normed.append(vals)
        while len(normed) < 2:
            normed.append({})
        ne, np_ = normed
        y = int(labels[r])
        target = {}
        for u in active:
            if target_mode == "slice":
                parts = [d[u] for d in (ne, np_) if u in d]
                target[u] = sum(parts) / len(parts) if parts else 0.0
            else:
                ie, ip = y in ne, y in np_
                te, tp = ne.get(u, 0.0), np_.get(u, 0.0)
                target[u] = (te + tp) / 2 if (ie and ip) else te if ie else tp
        zr = z[r, active]
        tr = torch.tensor([target[u] for u in active], dtype=torch.float64)
        total_mse += float(((zr - tr) ** 2).mean())
        total_ce += float(-torch.log_softmax(zr, 0)[active.index(y)])
    return (total_mse + lambda_ce * total_ce) / b


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_loop_oracle(case):
    logits, labels, kw = make_case(case, torch.float64)
    for mode in MODES:
        for norm in NORMS:
            got = ref_ed_loss(logits, labels, target_mode=mode, normalize=norm, lambda_ce=0.7, **kw)
            want = loop_oracle(logits, labels, target_mode=mode, normalize=norm, lambda_ce=0.7, **kw)
            assert abs(float(got) - want) <= 1e-10 * max(1.0, abs(want)), (mode, norm)


def test_reference_mt_equals_plain_with_one_full_head():
    """A single head covering every unit is the single-head loss."""
    logits, labels, kw = make_case("overlap_mask", torch.float64)
    heads = torch.ones(1, logits.shape[1], dtype=torch.bool)
    tids = torch.zeros(logits.shape[0], dtype=torch.int64)
    for mode in MODES:
        for norm in NORMS:
            a = ref_ed_loss(logits, labels, target_mode=mode, normalize=norm, **kw)
            b = ref_ed_loss(logits, labels, target_mode=mode, normalize=norm, task_ids=tids,
                            task_heads=heads, **kw)
            torch.testing.assert_close(a, b)


# -- fused op vs reference ------------------------------------------------------------------


def _loss_and_grad(fn, logits, labels, kw, mode, norm, lam=1.0):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels, target_mode=mode, normalize=norm, lambda_ce=lam, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _err(a, truth):
    return float((a.double() - truth.double()).abs().max())


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(device, dtype, case):
    logits, labels, kw = make_case(case, dtype, device)
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in kw.items()}
    for mode in MODES:
        for norm in NORMS:
            lam = 0.5 if norm == "standardize" else 1.0
            loss, g = _loss_and_grad(ed_loss, logits, labels, kw, mode, norm, lam)
            assert loss.dtype == acc_dtype(dtype) and loss.dim() == 0
            assert g.dtype == dtype and g.shape == logits.shape
            t_loss, t_g = _loss_and_grad(ref_ed_loss, logits.double(), labels, kw64, mode, norm, lam)
            r_loss, r_g = _loss_and_grad(ref_ed_loss, logits, labels, kw, mode, norm, lam)
            acc_eps = eps_of(acc_dtype(dtype))
            scale = max(float(t_loss.abs()), 1e-30)
            assert _err(loss, t_loss) <= 2 * _err(r_loss, t_loss) + 16 * acc_eps * scale, \
                (mode, norm, float(loss), float(t_loss), float(r_loss))
            gscale = max(float(t_g.abs().max()), 1e-30)
            slack = (16 * acc_eps + eps_of(dtype)) * gscale
            assert _err(g, t_g) <= 2 * _err(r_g, t_g) + slack, (mode, norm)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_dtypes_differ_from_logits(device):
    logits, labels, kw = make_case("split", torch.float32, device)
    kw16 = dict(kw, expert_logits=kw["expert_logits"].to(torch.bfloat16),
                prev_logits=kw["prev_logits"].to(torch.float64))
    kw_ref = dict(kw16, expert_logits=kw16["expert_logits"].double(),
                  prev_logits=kw16["prev_logits"].double())
    for mode in MODES:
        loss, g = _loss_and_grad(ed_loss, logits, labels, kw16, mode, "standardize")
        t_loss, t_g = _loss_and_grad(ref_ed_loss, logits.double(), labels, kw_ref, mode,
                                     "standardize")
        torch.testing.assert_close(loss.double(), t_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), t_g, rtol=1e-4, atol=1e-6)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_call_and_determinism(device):
    logits, labels, kw = make_case("large_c", torch.float32, device)
    with torch.no_grad():
        a = ed_loss(logits, labels, **kw)
    b = ed_loss(logits.requires_grad_(True), labels, **kw).detach()
    c = ed_loss(logits, labels, **kw).detach()
    assert float(a) == float(b) == float(c)


@requires_ops
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_cpu(case):
    logits, labels, kw = make_case(case, torch.float64)
    kwc = {k: (v.cuda() if torch.is_tensor(v) and k not in ("expert_classes", "prev_classes")
               else v) for k, v in kw.items()}
    for mode in MODES:
        for norm in NORMS:
            a, ga = _loss_and_grad(ed_loss, logits, labels, kw, mode, norm)
            b, gb = _loss_and_grad(ed_loss, logits.cuda(), labels.cuda(), kwc, mode, norm)
            torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gb.cpu(), ga, rtol=1e-10, atol=1e-13)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["split", "overlap_mask", "no_prev", "mt_overlap"])
def test_gradcheck_float64(device, case):
    logits, labels, kw = make_case(case, torch.float64, device)
    for mode in MODES:
        for norm in NORMS:
            x = logits.detach().clone().requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda t: ed_loss(t, labels, target_mode=mode, normalize=norm, lambda_ce=0.3, **kw),
                (x,))


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_opcheck(device, dtype):
    for case in ["split", "compact", "no_prev", "mt"]:
        logits, labels, kw = make_case(case, dtype, device)
        c = logits.shape[1]
        table = ed_class_table(kw["expert_classes"], kw.get("prev_classes"), c, device=device)
        for mode, norm in [("slice", "center"), ("per_sample", "standardize")]:
            for need_grad in (False, True):
                x = logits.detach().clone().requires_grad_(need_grad)
                args = (x, labels, kw["expert_logits"], kw.get("prev_logits"), table,
                        kw.get("task_ids"), kw.get("task_heads"), mode, norm, 0.5, need_grad)
                torch.library.opcheck(torch.ops.exml_fast.ed_loss.default, args,
                                      test_utils=("test_schema", "test_faketensor",
                                                  "test_aot_dispatch_dynamic"))
        g = torch.randn(logits.shape, device=device).to(dtype)
        torch.library.opcheck(torch.ops.exml_fast._ed_loss_backward.default,
                              (torch.tensor(0.7, dtype=acc_dtype(dtype), device=device), g))


@requires_ops
def test_compile_fullgraph():
    torch._dynamo.reset()
    logits, labels, kw = make_case("overlap_mask", torch.float32)
    w = torch.randn(logits.shape[1], logits.shape[1])

    def step(x):
        out = x @ w
        return ed_loss(out, labels, target_mode="per_sample", normalize="center", **kw)

    compiled = torch.compile(step, fullgraph=True)
    x = logits.detach().clone().requires_grad_(True)
    out = compiled(x)
    out.backward()
    x2 = logits.detach().clone().requires_grad_(True)
    expected = ref_ed_loss(x2 @ w, labels, target_mode="per_sample", normalize="center", **kw)
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_full_width_teachers_ignore_non_member_columns(device):
    """Only the set's columns of a (B, C) teacher are read: inf/nan elsewhere is harmless."""
    for case in ["split", "gaps", "mt"]:
        logits, labels, kw = make_case(case, torch.float32, device)
        dirty = dict(kw)
        for name, cls in [("expert_logits", "expert_classes"), ("prev_logits", "prev_classes")]:
            t = kw[name].clone()
            keep = torch.zeros(t.shape[1], dtype=torch.bool)
            keep[kw[cls]] = True
            t[:, ~keep.to(device)] = float("inf")
            t[0, ~keep.to(device)] = float("nan")
            dirty[name] = t
        for mode in MODES:
            a, ga = _loss_and_grad(ed_loss, logits, labels, kw, mode, "standardize")
            b, gb = _loss_and_grad(ed_loss, logits, labels, dirty, mode, "standardize")
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(ga, gb)


@requires_ops
def test_backward_scales_by_upstream_gradient():
    logits, labels, kw = make_case("gaps", torch.float64)
    x = logits.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(ed_loss(x, labels, **kw), x)
    (g3,) = torch.autograd.grad(-2.5 * ed_loss(x, labels, **kw), x)
    torch.testing.assert_close(g3, -2.5 * g1)


@requires_ops
def test_teachers_are_detached():
    """Targets are constants: expert/prev logits get no gradient, even if they require one."""
    logits, labels, kw = make_case("split", torch.float64)
    e = kw["expert_logits"].clone().requires_grad_(True)
    x = logits.clone().requires_grad_(True)
    loss = ed_loss(x, labels, **dict(kw, expert_logits=e))
    loss.backward()
    assert e.grad is None and x.grad is not None


@requires_ops
def test_double_backward_refused():
    logits, labels, kw = make_case("split", torch.float64)
    x = logits.clone().requires_grad_(True)
    # The saved gradient is a constant: a graph through it would give a wrong (zero)
    # second derivative, so create_graph=True is refused outright.
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ed_loss(x, labels, **kw), x, create_graph=True)
    (g,) = torch.autograd.grad(ed_loss(x, labels, **kw), x)  # first order still fine
    assert g.grad_fn is None


@requires_ops
def test_class_table_cache_follows_in_place_edits():
    logits, labels, kw = make_case("split", torch.float64)
    eset = torch.arange(5, 10)
    a = ed_loss(logits, labels, **dict(kw, expert_classes=eset))
    eset[0] = 4  # now {4, 6, 7, 8, 9}: a different set, same tensor object
    b = ed_loss(logits, labels, **dict(kw, expert_classes=eset))
    want = ref_ed_loss(logits, labels, **dict(kw, expert_classes=eset.clone()))
    torch.testing.assert_close(b, want)
    assert float(a) != float(b)


@requires_ops
def test_closed_form_small():
    """B = 1, C = 2, expert on unit 1, prev on unit 0, normalize none, lambda 0."""
    z = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([1])
    kw = dict(expert_logits=torch.tensor([[0.5]], dtype=torch.float64),
              expert_classes=torch.tensor([1]),
              prev_logits=torch.tensor([[3.0]], dtype=torch.float64),
              prev_classes=torch.tensor([0]), normalize="none", lambda_ce=0.0)
    # slice: target (3, 0.5): ((1-3)^2 + (2-0.5)^2) / 2
    torch.testing.assert_close(ed_loss(z, y, **kw), torch.tensor((4 + 2.25) / 2, dtype=torch.float64))
    # per_sample, label 1 in Y^i only: target (0, 0.5)
    torch.testing.assert_close(ed_loss(z, y, target_mode="per_sample", **kw),
                               torch.tensor((1 + 2.25) / 2, dtype=torch.float64))
    ce = F.cross_entropy(z, y)
    torch.testing.assert_close(ed_loss(z, y, **dict(kw, lambda_ce=2.0)),
                               torch.tensor((4 + 2.25) / 2, dtype=torch.float64) + 2 * ce)


# -- bad input ----------------------------------------------------------------------------


def _base():
    return make_case("split", torch.float32)


@pytest.mark.slow
def test_baseline_cpu_loops_pass_the_same_battery():
    """The CPU loops are built twice (baseline x86-64 and AVX2+FMA+F16C, picked at
    run time); EXML_FAST_CPU_ISA=base forces the baseline build."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "matches_reference and cpu"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "EXML_FAST_CPU_ISA": "base"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda z, y, kw: (z[0], y, kw), ValueError, "logits must have shape"),
        (lambda z, y, kw: (z[:0], y[:0], kw), ValueError, "logits must have shape"),
        (lambda z, y, kw: (z.long(), y, kw), TypeError, "logits must be float32"),
        (lambda z, y, kw: (z, y.int(), kw), ValueError, "labels must be an int64"),
        (lambda z, y, kw: (z, y[:3], kw), ValueError, "labels must be an int64"),
        (lambda z, y, kw: (z, y, dict(kw, expert_classes=torch.tensor([5, 5, 6]))),
         ValueError, "expert_classes must hold distinct"),
        (lambda z, y, kw: (z, y, dict(kw, expert_classes=torch.tensor([5, 10]))),
         ValueError, r"expert_classes must hold units in \[0, 10\)"),
        (lambda z, y, kw: (z, y, dict(kw, prev_classes=torch.zeros(9, dtype=torch.bool))),
         ValueError, "prev_classes as a bool mask must have shape"),
        (lambda z, y, kw: (z, y, dict(kw, prev_classes=torch.zeros(10, dtype=torch.bool))),
         ValueError, "prev_classes must name at least one class"),
        (lambda z, y, kw: (z, y, dict(kw, expert_classes=torch.tensor([[5]]))),
         ValueError, "expert_classes as an index tensor must be 1-D"),
        (lambda z, y, kw: (z, y, dict(kw, expert_classes=torch.tensor([5.0]))),
         TypeError, "expert_classes must be a"),
        (lambda z, y, kw: (z, y, dict(kw, expert_logits=torch.randn(7, 4))),
         ValueError, r"expert_logits must have shape \(7, 5 \(the size"),
        (lambda z, y, kw: (z, y, dict(kw, prev_logits=torch.randn(6, 10))),
         ValueError, "prev_logits must have shape"),
        (lambda z, y, kw: (z, y, dict(kw, prev_logits=torch.ones(7, 10, dtype=torch.int64))),
         TypeError, "prev_logits must be float32"),
        (lambda z, y, kw: (z, y, dict(kw, prev_logits=None)), ValueError,
         "prev_logits and prev_classes must be given together"),
        (lambda z, y, kw: (z, y, dict(kw, target_mode="paper")), ValueError,
         "target_mode must be one of"),
        (lambda z, y, kw: (z, y, dict(kw, normalize="zscore")), ValueError,
         "normalize must be one of"),
        (lambda z, y, kw: (z, y, dict(kw, task_ids=torch.zeros(7, dtype=torch.int64))),
         ValueError, "task_ids and task_heads must be given together"),
        (lambda z, y, kw: (z, y, dict(kw, task_ids=torch.zeros(7, dtype=torch.int64),
                                      task_heads=torch.ones(2, 9, dtype=torch.bool))),
         ValueError, r"task_heads must be a bool tensor of shape \(T, 10\)"),
    ],
)
def test_bad_input(mutate, exc, match):
    z, y, kw = _base()
    z, y, kw = mutate(z, y, kw)
    with pytest.raises(exc, match=match):
        ed_loss(z, y, **kw)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_bad_label_values(device):
    z, y, kw = make_case("gaps", torch.float32, device)
    y_out = y.clone()
    y_out[2] = 10
    # (CUDA, slice targets: an out-of-range label is a device-side assert, as in
    # F.cross_entropy, which would end the CUDA context; per_sample checks it.)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        ed_loss(z, y_out, target_mode="per_sample", **kw)
    if device == "cpu":
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
            ed_loss(z, y_out, **kw)
    y_neither = y.clone()
    y_neither[1] = 4  # unit 4 is in neither set of "gaps"
    ed_loss(z, y_neither, target_mode="slice", **kw)  # fine for slice targets
    with pytest.raises(ValueError, match="in expert_classes or prev_classes"):
        ed_loss(z, y_neither, target_mode="per_sample", **kw)
    zm, ym0, kwm = make_case("mt", torch.float32, device)
    ym = ym0.clone()
    ym[0] = int(kwm["task_heads"][int(kwm["task_ids"][0])].logical_not().nonzero()[0])
    with pytest.raises(ValueError, match="task head"):
        ed_loss(zm, ym, **kwm)
    bad_t = kwm["task_ids"].clone()
    bad_t[0] = 3
    with pytest.raises(ValueError, match="task_ids must lie"):
        ed_loss(zm, ym0, **dict(kwm, task_ids=bad_t))


@requires_ops
def test_bad_input_kernel():
    """The compiled op checks its arguments too (for callers of torch.ops directly)."""
    z, y, kw = _base()
    table = ed_class_table(kw["expert_classes"], kw["prev_classes"], 10)
    op = torch.ops.exml_fast.ed_loss
    with pytest.raises(RuntimeError, match="class_table must be an int32"):
        op(z, y, kw["expert_logits"], kw["prev_logits"], table[:-1], None, None, "slice",
           "center", 1.0, False)
    with pytest.raises(RuntimeError, match="target_mode must be"):
        op(z, y, kw["expert_logits"], kw["prev_logits"], table, None, None, "x", "center", 1.0,
           False)
    with pytest.raises(RuntimeError, match="expert_logits must have 5"):
        op(z, y, kw["expert_logits"][:, :4], kw["prev_logits"], table, None, None, "slice",
           "center", 1.0, False)
    with pytest.raises(RuntimeError, match="no prev_logits was given"):
        op(z, y, kw["expert_logits"], None, table, None, None, "slice", "center", 1.0, False)


# -- fallback -------------------------------------------------------------------------------


def test_fallback_without_extension():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import exml_fast\n"
        "from exml_fast.ops.ed_loss import ed_loss\n"
        "from exml_fast.reference.ed_loss import ed_loss as ref\n"
        "assert not exml_fast.has_ops()\n"
        "torch.manual_seed(0)\n"
        "z = torch.randn(6, 10, requires_grad=True); y = torch.arange(6)\n"
        "kw = dict(expert_logits=torch.randn(6, 5), expert_classes=torch.arange(5, 10),\n"
        "          prev_logits=torch.randn(6, 10), prev_classes=torch.arange(0, 5),\n"
        "          target_mode='per_sample', normalize='standardize')\n"
        "a = ed_loss(z, y, **kw); b = ref(z, y, **kw)\n"
        "assert torch.equal(a, b), (a, b)\n"
        "a.backward(); assert z.grad is not None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, EXML_FAST_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
