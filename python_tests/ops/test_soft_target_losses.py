"""exml_fast.ops.soft_target_losses (soft-target CE, KD, JS divergence) against the reference.

Truth is the reference run in float64 on the same input values; in each dtype
the fused op must be at least as accurate as the reference run in that dtype
(PyTorch's own error), up to a factor of 2 plus 32 units of rounding of the
accumulation dtype (and one rounding of the output dtype).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _util import DEVICES, DTYPES, acc_dtype, eps_of, requires_ops

from exml_fast.ops import soft_target_losses as ops
from exml_fast.reference import soft_target_losses as ref

pytestmark = requires_ops

SHAPES = {
    "b5000_k10": (5000, 10),
    "odd": (37, 13),
    "k1000": (9, 1000),
    "k1": (6, 1),
    "k8": (4, 8),
    "batch1": (1, 7),
    "empty": (0, 5),
    "strided_rows": None,  # every other row of a wider tensor
    "transposed": None,  # last dim not unit-stride: copied
}


def make_pair(case, device, dtype, scale=3.0, seed=0, second="logits"):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[case]

    def draw(b, k):
        if second == "probs":
            return torch.rand(b, k, generator=g)
        return torch.randn(b, k, generator=g) * scale

    if case == "strided_rows":
        a = (torch.randn(22, 11, generator=g) * scale)[::2]
        b = draw(22, 11)[::2]
    elif case == "transposed":
        a = (torch.randn(12, 9, generator=g) * scale).t()
        b = draw(12, 9).t()
    else:
        a = torch.randn(*shape, generator=g) * scale
        b = draw(*shape)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def grads(fn, inputs, upstream):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    gs = torch.autograd.grad(out, xs, upstream.to(out.dtype).expand_as(out) if out.dim() else upstream.to(out.dtype))
    return out.detach(), gs


def assert_close_to_truth(ours, torch_own, truth, dtype):
    ours, torch_own, truth = ours.double().cpu(), torch_own.double().cpu(), truth.double().cpu()
    if truth.numel() == 0:
        assert ours.shape == truth.shape
        return
    err_ours = (ours - truth).abs().nan_to_num(float("inf")).max().item()
    err_torch = (torch_own - truth).abs().nan_to_num(0.0).max().item()
    scale = max(truth.abs().max().item(), 1e-30)
    slack = (32 * eps_of(acc_dtype(dtype)) + eps_of(dtype)) * scale
    assert err_ours <= 2 * err_torch + slack, (
        f"error {err_ours:.3e} exceeds 2 x torch's own {err_torch:.3e} + {slack:.3e}"
    )


def check_op(fused_fn, ref_fn, inputs, dtype, upstream):
    out, g = grads(fused_fn, inputs, upstream)
    own_out, own_g = grads(ref_fn, inputs, upstream)
    truth_out, truth_g = grads(ref_fn, [t.double() for t in inputs], upstream.double())
    assert out.dtype == inputs[0].dtype and out.shape == truth_out.shape
    assert_close_to_truth(out, own_out, truth_out, dtype)
    for a, b, c, x in zip(g, own_g, truth_g, inputs):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_close_to_truth(a, b, c, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_ce_matches_reference(device, dtype, case, reduction):
    logits, target = make_pair(case, device, dtype, second="probs")
    up = torch.tensor(1.7, device=device) if reduction != "none" else (
        torch.randn(logits.shape[0], generator=torch.Generator().manual_seed(5)).to(device))
    kw = dict(temperature=20.0 if case == "b5000_k10" else 2.5, reduction=reduction)
    if logits.shape[0] == 0 and reduction == "mean":
        assert torch.isnan(ops.soft_target_cross_entropy(logits, target, **kw))
        return
    check_op(lambda z, t: ops.soft_target_cross_entropy(z, t, **kw),
             lambda z, t: ref.soft_target_cross_entropy(z, t, **kw), [logits, target], dtype, up)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
def test_kd_matches_reference(device, dtype, case):
    s, t = make_pair(case, device, dtype, seed=1)
    if s.shape[0] == 0:
        assert torch.isnan(ops.kd_loss(s, t, temperature=2.0))
        return
    # Both inputs require grad: the backward recomputes both softmaxes.
    check_op(lambda a, b: ops.kd_loss(a, b, temperature=2.0),
             lambda a, b: ref.kd_loss(a, b, temperature=2.0), [s, t], dtype,
             torch.tensor(0.8, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
def test_kd_frozen_teacher_matches_reference(device, dtype, case):
    # Teacher without grad (the usual KD case): the forward saves the student's
    # gradient factor and the backward only scales it.
    s, t = make_pair(case, device, dtype, seed=3)
    if s.shape[0] == 0:
        z = s.clone().requires_grad_(True)
        out = ops.kd_loss(z, t, temperature=2.0)
        assert torch.isnan(out)
        (gz,) = torch.autograd.grad(out, z)
        assert gz.shape == z.shape
        return
    up = torch.tensor(0.8, device=device)
    out, (gs,) = grads(lambda a: ops.kd_loss(a, t, temperature=2.0), [s], up)
    own_out, (own_gs,) = grads(lambda a: ref.kd_loss(a, t, temperature=2.0), [s], up)
    truth_out, (truth_gs,) = grads(lambda a: ref.kd_loss(a, t.double(), temperature=2.0),
                                   [s.double()], up.double())
    assert out.dtype == dtype and gs.dtype == dtype and gs.shape == s.shape
    assert_close_to_truth(out, own_out, truth_out, dtype)
    assert_close_to_truth(gs, own_gs, truth_gs, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kd_saved_grad_factor(device, dtype):
    g = torch.Generator().manual_seed(21)
    s = (torch.randn(7, 33, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(7, 33, generator=g) * 3).to(device=device, dtype=dtype)
    loss0, sv0, f0 = torch.ops.exml_fast.kd_loss(s, t, 2.0)
    assert f0.shape == (0, 0)
    loss1, sv1, f1 = torch.ops.exml_fast.kd_loss(s, t, 2.0, True)
    assert torch.equal(loss0, loss1) and torch.equal(sv0, sv1)
    assert f1.shape == s.shape and f1.dtype == acc_dtype(dtype)
    expect = torch.softmax(s.double() / 2, 1) - torch.softmax(t.double() / 2, 1)
    torch.testing.assert_close(f1.double(), expect, rtol=0,
                               atol=64 * (torch.finfo(acc_dtype(dtype)).eps))
    # The factor path equals the recomputing path up to the accumulation dtype's rounding.
    up = torch.tensor(1.3, device=device)
    gs_f, gt_f = torch.ops.exml_fast._kd_loss_backward(up, s, t, sv1, 2.0, False, f1)
    gs_r, _ = torch.ops.exml_fast._kd_loss_backward(up, s, t, sv0, 2.0, False)
    assert gt_f.shape == (0, 0) and gs_f.dtype == dtype
    tol = 64 * torch.finfo(acc_dtype(dtype)).eps + 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(gs_f.double(), gs_r.double(), rtol=tol, atol=tol * 1.3 * 2 / 7)
    f_copy = f1.clone()
    torch.ops.exml_fast._kd_loss_backward(up, s, t, sv1, 2.0, False, f1)
    assert torch.equal(f1, f_copy)  # the backward never writes the saved factor
    with pytest.raises(RuntimeError, match="grad_factor"):
        torch.ops.exml_fast._kd_loss_backward(up, s, t, sv1, 2.0, True, f1)
    with pytest.raises(RuntimeError, match="grad_factor must be"):
        torch.ops.exml_fast._kd_loss_backward(up, s, t, sv1, 2.0, False, f1[:, :5])


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kd_retain_graph_and_accumulation(teacher_grad):
    g = torch.Generator().manual_seed(22)
    s = (torch.randn(9, 17, generator=g) * 3).requires_grad_(True)
    t = (torch.randn(9, 17, generator=g) * 3).requires_grad_(teacher_grad)
    out = ops.kd_loss(s, t, temperature=2.0)
    (g1,) = torch.autograd.grad(out, s, retain_graph=True)
    (g2,) = torch.autograd.grad(out, s, retain_graph=True)
    assert torch.equal(g1, g2)
    out.backward(retain_graph=True)
    out.backward()
    torch.testing.assert_close(s.grad, 2 * g1, rtol=1e-6, atol=0)
    assert torch.equal(g1, g2)  # accumulation into .grad did not touch earlier results
    ref_s = s.detach().clone().requires_grad_(True)
    (er,) = torch.autograd.grad(ref.kd_loss(ref_s, t.detach(), temperature=2.0), ref_s)
    torch.testing.assert_close(g1, er, rtol=1e-4, atol=1e-7)
    if teacher_grad:
        assert t.grad is not None and t.grad.shape == t.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("clamp", [(0.01, 0.99), (0.0, 1.0), (0.05, 0.3)], ids=str)
def test_js_matches_reference(device, dtype, case, clamp):
    a, b = make_pair(case, device, dtype, seed=2)
    kw = dict(temperature=3.0, clamp=clamp)
    if a.shape[0] == 0:
        assert torch.isnan(ops.js_divergence(a, b, **kw))
        return
    check_op(lambda x, y: ops.js_divergence(x, y, **kw),
             lambda x, y: ref.js_divergence(x, y, **kw), [a, b], dtype,
             torch.tensor(1.3, device=device))


# ---- the small-K CPU path --------------------------------------------------------------------------
# Rows of K <= 32 with fp32 accumulation (fp32, fp16, bf16 logits) take the rows-across-lanes loops on
# CPUs with AVX2 (8 rows a register) or AVX-512 (16); fp64, K > 32 and EXML_FAST_CPU_ISA=base take the
# row loops. The cases: row lengths around the register widths and the path's limit (33 is past it);
# batches that leave a partial block, or a block without the second one the forward pairs it with
# (17, 40); operands read in place with a row stride (a column slice of a wider tensor) or a stride of
# 0 (one target row broadcast over the batch). Gradients are taken w.r.t. the tensors the views come
# from, so that the kernels see the strided operands themselves.
SMALL_K = (1, 2, 3, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33)
SMALL_CASES = [(b, layout) for b in (1, 5, 17, 40, 300)
               for layout in ("contiguous", "column_slice", "broadcast_second")]
# KD and JS run the dtypes that take the small-K loops (fp64 takes the row loops, which the battery
# above covers) and leave out B = 1, which takes no code path that B = 5 (one partial block) does
# not. Both because a divergence near 0 is formed by the fused formulas (row and small-K loops alike)
# as a difference of O(1) log-probability terms, e.g. KL_r = sum_k p_k ((zt_k - zs_k) - (lse_t -
# lse_s)), and is off by a few roundings of those terms: with one row, or in fp64 (where torch's own
# error is 0 by construction), that can exceed this suite's bound of 32 roundings of the result.
DIVERGENCE_CASES = [(b, layout) for b, layout in SMALL_CASES if b > 1]
DIVERGENCE_DTYPES = [d for d in DTYPES if d != torch.float64]


def small_k_leaves(b, k, dtype, layout, seed, second="logits"):
    """The tensors gradients are taken of, and a function mapping them to the (B, K) operands."""
    g = torch.Generator().manual_seed(seed)
    cols = k + 3 if layout == "column_slice" else k

    def draw(rows, probs):
        v = torch.rand(rows, cols, generator=g) if probs else torch.randn(rows, cols, generator=g) * 3
        return v.to(dtype)  # before slicing: .to() of a sliced tensor would copy it to contiguous

    first = draw(b, False)
    other = draw(1 if layout == "broadcast_second" else b, second == "probs")

    def operands(x, y):
        if layout == "column_slice":
            return x[:, :k], y[:, 2:k + 2]
        if layout == "broadcast_second":
            return x, y.expand(b, k)
        return x, y

    return (first, other), operands


def check_small_k(fused_fn, ref_fn, leaves, operands, dtype, upstream, needs_grad=(True, True)):
    """check_op's comparison for operands that are views: values and gradients w.r.t. the leaves."""

    def run(fn, ls, up):
        xs = [t.detach().clone().requires_grad_(rg) for t, rg in zip(ls, needs_grad)]
        out = fn(*operands(*xs))
        wrt = [x for x in xs if x.requires_grad]
        return out.detach(), torch.autograd.grad(out, wrt, up.to(out.dtype))

    out, g = run(fused_fn, leaves, upstream)
    own_out, own_g = run(ref_fn, leaves, upstream)
    truth_out, truth_g = run(ref_fn, [t.double() for t in leaves], upstream.double())
    assert out.dtype == leaves[0].dtype and out.shape == truth_out.shape
    assert_close_to_truth(out, own_out, truth_out, dtype)
    for a, b, c in zip(g, own_g, truth_g):
        assert a.shape == c.shape
        assert_close_to_truth(a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", SMALL_K)
def test_small_k_soft_ce_matches_reference(k, dtype):
    for i, (b, layout) in enumerate(SMALL_CASES):
        reduction = ("none", "mean", "sum")[i % 3]
        kw = dict(temperature=(2.5, 0.7, 20.0)[i % 3], reduction=reduction)
        leaves, operands = small_k_leaves(b, k, dtype, layout, seed=100 + i, second="probs")
        g = torch.Generator().manual_seed(i)
        up = torch.randn(b, generator=g) if reduction == "none" else torch.tensor(1.7)
        check_small_k(lambda z, t: ops.soft_target_cross_entropy(z, t, **kw),
                      lambda z, t: ref.soft_target_cross_entropy(z, t, **kw), leaves, operands, dtype, up)


@pytest.mark.parametrize("dtype", DIVERGENCE_DTYPES, ids=str)
@pytest.mark.parametrize("k", SMALL_K)
def test_small_k_kd_matches_reference(k, dtype):
    # Odd cases freeze the teacher: the forward then also writes the student's gradient factor.
    for i, (b, layout) in enumerate(DIVERGENCE_CASES):
        temperature = (2.0, 0.6, 4.0)[i % 3]
        leaves, operands = small_k_leaves(b, k, dtype, layout, seed=200 + i)
        check_small_k(lambda s, t: ops.kd_loss(s, t, temperature=temperature),
                      lambda s, t: ref.kd_loss(s, t, temperature=temperature), leaves, operands, dtype,
                      torch.tensor(0.8), needs_grad=(True, i % 2 == 0))


@pytest.mark.parametrize("dtype", DIVERGENCE_DTYPES, ids=str)
@pytest.mark.parametrize("k", SMALL_K)
def test_small_k_js_matches_reference(k, dtype):
    for i, (b, layout) in enumerate(DIVERGENCE_CASES):
        kw = dict(temperature=(3.0, 0.8, 1.5)[i % 3], clamp=((0.01, 0.99), (0.0, 1.0), (0.05, 0.3))[i % 3])
        leaves, operands = small_k_leaves(b, k, dtype, layout, seed=300 + i)
        check_small_k(lambda x, y: ops.js_divergence(x, y, **kw),
                      lambda x, y: ref.js_divergence(x, y, **kw), leaves, operands, dtype,
                      torch.tensor(1.3))


@pytest.mark.slow
def test_baseline_cpu_loops_pass_the_small_k_battery():
    """EXML_FAST_CPU_ISA=base forces the baseline build, which has no small-K loops: the row loops must
    pass the same small-K value and gradient checks."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k",
         "small_k and matches_reference and (float32 or bfloat16)"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "EXML_FAST_CPU_ISA": "base"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_soft_ce_targets_not_renormalised_and_target_grad_only_when_needed():
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(5, 4, dtype=torch.float64) * 3  # rows sum to ~4.5
    out = ops.soft_target_cross_entropy(z, t, temperature=1.5, reduction="none")
    torch.testing.assert_close(out, -(t * torch.log_softmax(z / 1.5, 1)).sum(1))
    (gz,) = torch.autograd.grad(out.sum(), z)
    p = torch.softmax(z / 1.5, 1)
    torch.testing.assert_close(gz, (p * t.sum(1, keepdim=True) - t) / 1.5)
    t.requires_grad_(True)
    out = ops.soft_target_cross_entropy(z, t, temperature=1.5, reduction="sum")
    gz, gt = torch.autograd.grad(out, [z, t])
    torch.testing.assert_close(gt, -torch.log_softmax(z / 1.5, 1))


def test_kd_matches_closed_form_and_teacher_grad():
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    out = ops.kd_loss(s, t, temperature=4.0)
    expect = torch.nn.functional.kl_div(torch.log_softmax(s / 4, 1), torch.softmax(t / 4, 1),
                                        reduction="batchmean") * 16
    torch.testing.assert_close(out, expect)
    assert torch.autograd.gradcheck(lambda a, b: ops.kd_loss(a, b, temperature=4.0), (s, t))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(5, 7, generator=g) * 2).double().to(device).requires_grad_(True)
    t = torch.rand(5, 7, generator=g).double().to(device).requires_grad_(True)
    y = (torch.randn(5, 7, generator=g) * 2).double().to(device).requires_grad_(True)
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: ops.soft_target_cross_entropy(a, b, temperature=1.7, reduction=red), (z, t))
    assert torch.autograd.gradcheck(lambda a, b: ops.kd_loss(a, b, temperature=2.0), (z, y))
    # clamp (0.05, 0.3) puts elements on both sides of each bound; gradcheck's
    # finite differences stay off the kinks for these values.
    for clamp in ((0.0, 1.0), (0.05, 0.3)):
        assert torch.autograd.gradcheck(
            lambda a, b: ops.js_divergence(a, b, temperature=3.0, clamp=clamp), (z, y))
    zs = z.detach()[:, ::2].clone().t().contiguous().t().requires_grad_(True)  # column-major
    teacher = y.detach()[:, :4]
    assert torch.autograd.gradcheck(lambda a: ops.kd_loss(a, teacher, temperature=1.0), (zs,))
    frozen = y.detach()
    assert torch.autograd.gradcheck(lambda a: ops.kd_loss(a, frozen, temperature=2.0), (z,))


def test_js_lo_zero_underflow_is_finite():
    a = torch.tensor([[0.0, 400.0, -400.0], [1.0, 2.0, 3.0]], requires_grad=True)
    b = torch.tensor([[0.0, 400.0, -400.0], [3.0, 2.0, 1.0]], requires_grad=True)
    out = ops.js_divergence(a, b, temperature=1.0, clamp=(0.0, 1.0))
    ga, gb = torch.autograd.grad(out, [a, b])
    assert torch.isfinite(out) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    # Row 0 is identical in a and b (JS = 0); row 1 matches the reference.
    expect = ref.js_divergence(a[1:].detach(), b[1:].detach(), clamp=(0.0, 1.0)) / 2
    torch.testing.assert_close(out, expect)


ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_opcheck(device, dtype):
    for case in ("odd", "batch1", "empty", "strided_rows", "transposed"):
        a, b = make_pair(case, device, dtype)
        p = b.abs()
        # The batch mean of zero rows is NaN, which compares unequal to itself in
        # opcheck's eager-vs-traced check: the empty case skips that check there.
        nan_safe = ALL_CHECKS if a.shape[0] else ("test_schema", "test_autograd_registration",
                                            "test_faketensor")
        for rg in (False, True):
            ai = a.detach().clone().requires_grad_(rg)
            for red in (0, 1, 2):
                torch.library.opcheck(torch.ops.exml_fast.soft_target_cross_entropy.default,
                                      (ai, p, 3.0, red), test_utils=nan_safe if red == 1 else ALL_CHECKS)
            torch.library.opcheck(torch.ops.exml_fast.kd_loss.default, (ai, b, 2.0),
                                  test_utils=nan_safe)
            for save in (False, True):
                torch.library.opcheck(torch.ops.exml_fast.kd_loss.default, (ai, b, 2.0, save),
                                      test_utils=nan_safe)
                bt = b.detach().clone().requires_grad_(True)
                torch.library.opcheck(torch.ops.exml_fast.kd_loss.default, (ai, bt, 2.0, save),
                                      test_utils=nan_safe)
            torch.library.opcheck(torch.ops.exml_fast.js_divergence.default,
                                  (ai, b, 3.0, 0.01, 0.99), test_utils=nan_safe)
        acc = acc_dtype(dtype)
        n = a.shape[0]
        utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        _, sv = torch.ops.exml_fast.soft_target_cross_entropy(a, p, 3.0, 0)
        torch.library.opcheck(torch.ops.exml_fast._soft_target_cross_entropy_backward.default,
                              (torch.randn(n, device=device, dtype=acc), a, p, sv, 3.0, 0, True),
                              test_utils=utils)
        _, sv, _ = torch.ops.exml_fast.kd_loss(a, b, 2.0)
        torch.library.opcheck(torch.ops.exml_fast._kd_loss_backward.default,
                              (torch.tensor(1.0, device=device), a, b, sv, 2.0, False), test_utils=utils)
        torch.library.opcheck(torch.ops.exml_fast._kd_loss_backward.default,
                              (torch.tensor(1.0, device=device), a, b, sv, 2.0, True), test_utils=utils)
        _, sv, fac = torch.ops.exml_fast.kd_loss(a, b, 2.0, True)
        torch.library.opcheck(torch.ops.exml_fast._kd_loss_backward.default,
                              (torch.tensor(1.0, device=device), a, b, sv, 2.0, False, fac),
                              test_utils=utils)
        _, sv = torch.ops.exml_fast.js_divergence(a, b, 3.0, 0.01, 0.99)
        torch.library.opcheck(torch.ops.exml_fast._js_divergence_backward.default,
                              (torch.tensor(1.0, device=device), a, b, sv, 3.0, 0.01, 0.99),
                              test_utils=utils)


def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(s, t, p):
        return (ops.soft_target_cross_entropy(s, p, temperature=20.0)
                + ops.kd_loss(s, t, temperature=2.0)
                + 1 - ops.js_divergence(s, t, temperature=3.0, clamp=(0.01, 0.99)))

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(16, 10, generator=g) * 3).requires_grad_(True)
    t = (torch.randn(16, 10, generator=g) * 3).requires_grad_(True)
    p = torch.softmax(torch.randn(16, 10, generator=g), 1)
    out = compiled(s, t, p)
    gs, gt = torch.autograd.grad(out, [s, t])
    s2, t2 = s.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    expect = (ref.soft_target_cross_entropy(s2, p, temperature=20.0)
              + ref.kd_loss(s2, t2, temperature=2.0)
              + 1 - ref.js_divergence(s2, t2, temperature=3.0, clamp=(0.01, 0.99)))
    es, et = torch.autograd.grad(expect, [s2, t2])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, es, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gt, et, rtol=1e-4, atol=1e-7)


def test_compile_fullgraph_frozen_teacher():
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: ops.kd_loss(s, t, temperature=3.0), fullgraph=True)
    g = torch.Generator().manual_seed(6)
    s = (torch.randn(12, 40, generator=g) * 3).requires_grad_(True)
    t = torch.randn(12, 40, generator=g) * 3
    out = compiled(s, t)
    (gs,) = torch.autograd.grad(out, s)
    s2 = s.detach().clone().requires_grad_(True)
    expect = ref.kd_loss(s2, t, temperature=3.0)
    (es,) = torch.autograd.grad(expect, s2)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, es, rtol=1e-4, atol=1e-7)


def test_double_backward_refused():
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for loss in (lambda: ops.soft_target_cross_entropy(z, torch.rand(4, 5, dtype=torch.float64)),
                 lambda: ops.kd_loss(z, y, temperature=2.0),
                 lambda: ops.kd_loss(z, y.detach(), temperature=2.0),
                 lambda: ops.js_divergence(z, y, temperature=3.0)):
        (g,) = torch.autograd.grad(loss(), z, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            g.sum().backward()


def test_bad_inputs():
    z, t = torch.randn(4, 3), torch.rand(4, 3)
    with pytest.raises(ValueError, match="logits and target_probs must have the same shape"):
        ops.soft_target_cross_entropy(z, t[:, :2])
    with pytest.raises(ValueError, match="logits must have shape"):
        ops.soft_target_cross_entropy(z[0], t[0])
    with pytest.raises(TypeError, match="same dtype"):
        ops.soft_target_cross_entropy(z, t.double())
    with pytest.raises(TypeError, match="float32, float64"):
        ops.kd_loss(z.long(), t.long(), temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.kd_loss(z, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.soft_target_cross_entropy(z, t, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        ops.js_divergence(z, t, temperature="3")
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.soft_target_cross_entropy(z, t, reduction="batchmean")
    with pytest.raises(ValueError, match="clamp must satisfy"):
        ops.js_divergence(z, t, clamp=(0.5, 0.5))
    with pytest.raises(ValueError, match="clamp must satisfy"):
        ops.js_divergence(z, t, clamp=(-0.1, 1.0))
    with pytest.raises(ValueError, match="at least one class"):
        ops.kd_loss(torch.randn(3, 0), torch.randn(3, 0), temperature=1.0)
    with pytest.raises(ValueError, match="student_logits and teacher_logits"):
        ops.kd_loss(z, torch.randn(5, 3), temperature=1.0)
    # The compiled ops check too (for callers of torch.ops directly).
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        torch.ops.exml_fast.kd_loss(z, t, 0.0)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        torch.ops.exml_fast.js_divergence(z, t[:2], 1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="clamp must satisfy"):
        torch.ops.exml_fast.js_divergence(z, t, 1.0, 0.9, 0.1)
    with pytest.raises(RuntimeError, match="reduction must be"):
        torch.ops.exml_fast.soft_target_cross_entropy(z, t, 1.0, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(11)
    for b, k in ((5000, 10), (1216, 1000), (3, 3000), (1, 1)):
        z = torch.randn(b, k, generator=g) * 3
        y = torch.randn(b, k, generator=g) * 3
        for fn in (lambda a, c: ops.soft_target_cross_entropy(a, c.abs(), temperature=20.0),
                   lambda a, c: ops.kd_loss(a, c, temperature=2.0),
                   lambda a, c: ops.js_divergence(a, c, temperature=3.0, clamp=(0.01, 0.99))):
            out_cpu, g_cpu = grads(fn, [z, y], torch.tensor(1.0))
            out_gpu, g_gpu = grads(fn, [z.cuda(), y.cuda()], torch.tensor(1.0, device="cuda"))
            torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=2e-5, atol=1e-6)
            for a, c in zip(g_gpu, g_cpu):
                torch.testing.assert_close(a.cpu(), c, rtol=2e-4, atol=1e-7)


def test_fallback_without_extension():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "from exml_fast.ops import soft_target_losses as L\n"
        "from exml_fast.reference import soft_target_losses as R\n"
        "z = torch.randn(6, 5, requires_grad=True); t = torch.randn(6, 5)\n"
        "a = L.kd_loss(z, t, temperature=2.0); b = R.kd_loss(z, t, temperature=2.0)\n"
        "assert torch.equal(a, b)\n"
        "a = L.js_divergence(z, t, temperature=3.0, clamp=(0.01, 0.99))\n"
        "assert torch.equal(a, R.js_divergence(z, t, temperature=3.0, clamp=(0.01, 0.99)))\n"
        "a = L.soft_target_cross_entropy(z, t.softmax(1), reduction='none')\n"
        "assert a.shape == (6,)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "EXML_FAST_DISABLE_EXT": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def _hand_js(a, b, temperature, lo, hi, form):
    """The ADI term by hand, element by element: softmaxes, M from the un-clamped ones, clamps, then
    0.5 (KL(P||M) + KL(Q||M)) ("js") or 0.5 (KL(M||P) + KL(M||Q)) ("public"), averaged over rows."""
    import math

    total = 0.0
    for row_a, row_b in zip(a.tolist(), b.tolist()):
        ea = [math.exp(v / temperature) for v in row_a]
        eb = [math.exp(v / temperature) for v in row_b]
        p = [v / sum(ea) for v in ea]
        q = [v / sum(eb) for v in eb]
        m = [(x + y) / 2 for x, y in zip(p, q)]
        p, q, m = ([min(max(v, lo), hi) for v in r] for r in (p, q, m))
        if form == "js":
            kl = sum(x * math.log(x / z) for x, z in zip(p, m)) + sum(y * math.log(y / z) for y, z in zip(q, m))
        else:
            kl = sum(z * math.log(z / x) for x, z in zip(p, m)) + sum(z * math.log(z / y) for y, z in zip(q, m))
        total += 0.5 * kl
    return total / len(a)


@pytest.mark.parametrize("form", ["js", "public"])
@pytest.mark.parametrize("clamp", [(0.0, 1.0), (0.01, 0.99)])
def test_js_divergence_forms_equal_a_hand_computation(form, clamp):
    a = torch.tensor([[4.0, 0.0, -3.0, 1.0], [0.5, 2.0, 0.0, -6.0], [9.0, -9.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0, 0.0, -2.0], [-1.0, 0.5, 1.5, 3.0], [-9.0, 9.0, 0.0, 0.0]], dtype=torch.float64)
    expect = _hand_js(a, b, 1.5, *clamp, form)
    for fn in (ops.js_divergence, ref.js_divergence):
        got = fn(a, b, temperature=1.5, clamp=clamp, form=form)
        assert got.item() == pytest.approx(expect, rel=1e-12, abs=1e-15), fn.__module__
    other = _hand_js(a, b, 1.5, *clamp, "public" if form == "js" else "js")
    assert abs(expect - other) > 1e-3  # the two forms differ on these rows


def test_js_divergence_public_form_is_the_public_scripts_term_and_has_gradients():
    from exml_fast.reference.public.deepinversion import _competition

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    student.requires_grad_(True)
    public = ops.js_divergence(student, teacher, temperature=3.0, clamp=(0.01, 0.99), form="public")
    torch.testing.assert_close(1 - public.clamp(0, 1), _competition(teacher, student))
    (public.sum()).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="js_divergence: form must be one of js, public; got 'kl'"):
        ops.js_divergence(teacher, teacher, form="kl")


# (name, fused, reference): the second argument is soft targets (probabilities) for the cross-entropy, logits
# for the others
_AUTOCAST_CASES = [
    ("soft_target_cross_entropy", lambda a, b: ops.soft_target_cross_entropy(a, b, temperature=2.0),
     lambda a, b: ref.soft_target_cross_entropy(a, b, temperature=2.0)),
    ("kd_loss", lambda a, b: ops.kd_loss(a, b, temperature=4.0), lambda a, b: ref.kd_loss(a, b, temperature=4.0)),
    ("js_divergence", lambda a, b: ops.js_divergence(a, b, temperature=3.0, clamp=(0.01, 0.99)),
     lambda a, b: ref.js_divergence(a, b, temperature=3.0, clamp=(0.01, 0.99))),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("second", ["16-bit", "float32"])
@pytest.mark.parametrize("case", _AUTOCAST_CASES, ids=[c[0] for c in _AUTOCAST_CASES])
def test_under_autocast_the_losses_run_in_float32_as_torchs_do(device, dtype, second, case):
    # autocast's float32 list (log_softmax, kl_div, ...): 16-bit logits from an autocast forward are taken in
    # float32, and may meet float32 targets kept from outside the region (a dtype error before)
    name, fused, reference = case
    g = torch.Generator().manual_seed(11)
    a = (3 * torch.randn(6, 10, generator=g)).to(dtype).to(device)
    b = 3 * torch.randn(6, 10, generator=g)
    b = (torch.softmax(b, 1) if name == "soft_target_cross_entropy" else b).to(device)
    b = b.to(dtype) if second == "16-bit" else b
    leaves = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    with torch.autocast(torch.device(device).type, dtype=dtype):
        loss = fused(*leaves)
    assert loss.dtype == torch.float32
    want_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    want = reference(*want_leaves)  # the same values taken in float32, outside autocast
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    want.backward()
    for got, exp in zip(leaves, want_leaves):
        # float32 gradients, rounded to the leaf's dtype on the way back (one rounding of that dtype apart)
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.float(), exp.grad, rtol=eps_of(got.dtype), atol=1e-6)

def test_under_autocast_float64_logits_are_left_in_float64():
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.kd_loss(a, b, temperature=2.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.kd_loss(a, b, temperature=2.0))


def test_compile_fullgraph_under_autocast():
    torch._dynamo.reset()
    a = torch.randn(4, 10, requires_grad=True)
    t = torch.softmax(torch.randn(4, 10), 1)
    w = torch.randn(10, 10)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.soft_target_cross_entropy(x @ w, t)  # a bfloat16 matmul meets float32 targets
    got = torch.compile(f, fullgraph=True)(a)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, f(a))
    got.backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
