"""exml_fast.ops.bn_stats / bn_stats_loss against exml_fast.reference.

Tolerances: the ground truth is computed in numpy.longdouble (x87 80-bit, a
64-bit mantissa) from the same input values. In each dtype the fused op must be at least as accurate as
PyTorch's own computation in that dtype (the reference run in that dtype), up
to a factor of 2 plus a few units of rounding of the accumulation dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _util import DEVICES, DTYPES, acc_dtype, eps_of, requires_ops

from exml_fast import ops
from exml_fast import reference as ref

pytestmark = requires_ops


def sample_inputs(device: str, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """A battery of BN inputs: odd sizes, N = 1, 1x1 spatial, large C, every rank,
    channels_last, non-contiguous, long runs and a large mean offset."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype).to(device)

    cases = [
        ("nchw", randn(8, 16, 7, 9, scale=2.0, offset=0.5)),
        ("nchw_channels_last", randn(8, 16, 7, 9, scale=2.0).to(memory_format=torch.channels_last)),
        ("batch1", randn(1, 5, 3, 3)),
        ("spatial1x1", randn(32, 24, 1, 1)),
        ("large_c", randn(3, 600, 5, 5)),
        ("large_c_channels_last", randn(3, 600, 5, 5).to(memory_format=torch.channels_last)),
        ("2d", randn(64, 3, offset=-1.0)),
        ("2d_batch1", randn(1, 7)),
        ("3d", randn(7, 5, 13)),
        ("5d", randn(2, 3, 4, 5, 6)),
        ("5d_channels_last", randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)),
        ("long_runs", randn(2, 2, 97, 101, scale=3.0)),  # runs longer than one CPU block
        ("many_rows_channels_last", randn(16, 8, 41, 39).to(memory_format=torch.channels_last)),
        ("offset_mean", randn(4, 6, 10, 10, scale=0.1, offset=50.0)),
        ("one_channel", randn(5, 1, 9, 9)),
        ("slice_channels", randn(6, 10, 5, 5)[:, ::2]),
        ("transposed_spatial", randn(4, 3, 6, 5).transpose(2, 3)),
        ("slice_batch", randn(9, 4, 6, 6)[1::2]),
    ]
    return cases


def case_ids():
    return [name for name, _ in sample_inputs("cpu", torch.float32)]


def _ld(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy().astype(np.longdouble)


def truth_stats(x: torch.Tensor):
    """Mean and biased variance per channel, in long double, two-pass."""
    a = np.moveaxis(_ld(x), 1, 0).reshape(x.shape[1], -1)
    mean = a.mean(axis=1)
    var = ((a - mean[:, None]) ** 2).mean(axis=1)
    return mean, var


def truth_grad(x: torch.Tensor, gm: torch.Tensor, gv: torch.Tensor) -> np.ndarray:
    """dx = gm / M + 2 gv (x - mean) / M, in long double, in x's (N, C, ...) shape."""
    mean, _ = truth_stats(x)
    m = x.numel() // x.shape[1]
    bshape = (1, -1) + (1,) * (x.dim() - 2)
    xa = _ld(x)
    return _ld(gm).reshape(bshape) / m + 2 * _ld(gv).reshape(bshape) * (
        xa - mean.reshape(bshape)
    ) / m


def assert_as_accurate_as_torch(ours, torch_own, truth, dtype, extra_slack=0.0):
    """max|ours - truth| <= 2 max|torch_own - truth| + 8 eps_acc max|truth| (+ extra)."""
    err_ours = float(np.abs(_ld(ours) - truth).max())
    err_torch = float(np.abs(_ld(torch_own) - truth).max())
    scale = max(float(np.abs(truth).max()), 1e-30)
    slack = 8 * eps_of(acc_dtype(dtype)) * scale + extra_slack * scale
    assert err_ours <= 2 * err_torch + slack, (
        f"error {err_ours:.3e} exceeds 2 x torch's own {err_torch:.3e} + {slack:.3e}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", case_ids())
def test_forward_matches_reference(device, dtype, case):
    x = dict(sample_inputs(device, dtype))[case]
    mean, var = ops.bn_stats(x)
    assert mean.dtype == acc_dtype(dtype) and var.dtype == acc_dtype(dtype)
    assert mean.shape == (x.shape[1],) and var.shape == (x.shape[1],)
    assert mean.device == x.device
    truth_m, truth_v = truth_stats(x)
    torch_m, torch_v = ref.bn_stats(x)  # PyTorch computing in x's own dtype
    assert_as_accurate_as_torch(mean, torch_m, truth_m, dtype)
    assert_as_accurate_as_torch(var, torch_v, truth_v, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", case_ids())
def test_backward_matches_reference(device, dtype, case):
    x = dict(sample_inputs(device, dtype))[case]
    c = x.shape[1]
    g = torch.Generator().manual_seed(7)
    gm = torch.randn(c, generator=g).to(device)
    gv = torch.randn(c, generator=g).to(device)

    def grad_of(fn, inp):
        inp = inp.detach().requires_grad_(True)
        m, v = fn(inp)
        (m * gm.to(m.dtype)).sum().add((v * gv.to(v.dtype)).sum()).backward()
        return inp.grad

    dx = grad_of(ops.bn_stats, x)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 and not x.is_contiguous():
        assert dx.is_contiguous(memory_format=torch.channels_last)
    truth = truth_grad(x, gm, gv)
    torch_own = grad_of(ref.bn_stats, x)
    # dx is rounded to x's dtype on output: allow one rounding of that dtype.
    assert_as_accurate_as_torch(dx, torch_own, truth, dtype, extra_slack=eps_of(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_only_one_output_used(device):
    """Autograd passes None for an unused output; both halves must still work."""
    x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    m, _ = ops.bn_stats(x)
    (gx,) = torch.autograd.grad(m.sum(), x)
    torch.testing.assert_close(gx, torch.full_like(x, 1.0 / 100))
    _, v = ops.bn_stats(x)
    (gx,) = torch.autograd.grad(v.sum(), x)
    mean = x.mean((0, 2, 3), keepdim=True)
    torch.testing.assert_close(gx, 2 * (x - mean) / 100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,channels_last",
    [((3, 4, 5, 3), False), ((3, 4, 5, 3), True), ((6, 5), False), ((2, 3, 7), False),
     ((2, 2, 3, 2, 3), False)],
)
def test_gradcheck_float64(device, shape, channels_last):
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.bn_stats, (x,))
    rm = torch.randn(shape[1], dtype=torch.float64, device=device)
    rv = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5
    for form in ("l2", "mse", "sq_std"):
        assert torch.autograd.gradcheck(
            lambda t: ops.bn_stats_loss(t, rm, rv, form=form), (x,)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_opcheck(device, dtype):
    for name, x in sample_inputs(device, dtype):
        if name in ("large_c", "large_c_channels_last", "long_runs", "many_rows_channels_last"):
            continue  # opcheck's autograd checks are slow on big inputs; covered above
        for requires_grad in (False, True):
            xi = x.detach().clone(memory_format=torch.preserve_format)
            if not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
                xi = x.detach()  # keep the non-dense strides
            xi.requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.exml_fast.bn_stats.default, (xi,))
        c = x.shape[1]
        acc = acc_dtype(dtype)
        args = (torch.randn(c, dtype=acc, device=device), torch.randn(c, dtype=acc, device=device),
                x.detach(), torch.randn(c, dtype=acc, device=device))
        torch.library.opcheck(
            torch.ops.exml_fast._bn_stats_backward.default, args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@pytest.mark.parametrize("form", ["l2", "mse", "sq_std"])
@pytest.mark.parametrize("device", DEVICES)
def test_loss_matches_reference(form, device):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 12, 6, 6, generator=g) * 1.5 + 0.3).to(device)
    rm = torch.randn(12, generator=g).to(device)
    rv = (torch.rand(12, generator=g) + 0.5).to(device)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la = ops.bn_stats_loss(xa, rm, rv, form=form)
    lb = ref.bn_stats_loss(xb, rm, rv, form=form)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)


def test_loss_forms_closed_form():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # per-channel mean (2, 4), var (1, 4)
    rm = torch.tensor([0.0, 1.0])
    rv = torch.tensor([1.0, 0.0])
    l2 = ops.bn_stats_loss(x, rm, rv, form="l2")
    torch.testing.assert_close(l2, torch.tensor(13.0).sqrt() + torch.tensor(4.0))
    mse = ops.bn_stats_loss(x, rm, rv, form="mse")
    torch.testing.assert_close(mse, torch.tensor((4 + 9) / 2 + (0 + 16) / 2))
    sq = ops.bn_stats_loss(x, rm, rv, form="sq_std", eps=0.0)
    torch.testing.assert_close(sq, torch.tensor(13.0 + 0 + 4.0))


def test_double_backward_refused():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    m, v = ops.bn_stats(x)
    (g,) = torch.autograd.grad(v.square().sum() + m.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_compile_fullgraph():
    torch._dynamo.reset()
    rm, rv = torch.randn(8), torch.rand(8) + 0.5

    def step(x):
        return ops.bn_stats_loss(x, rm, rv, form="l2") + x.square().mean()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    expected = ref.bn_stats_loss(x2, rm, rv) + x2.square().mean()
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-7)


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(5), "x must have shape"),
        (torch.randn(1, 2, 1, 1, 1, 1), "x must have shape"),
        (torch.ones(4, 3, dtype=torch.int64), "x must be float32"),
        (torch.ones(4, 3, dtype=torch.bool), "x must be float32"),
        (torch.randn(0, 3, 4, 4), "no elements"),
        (torch.randn(2, 3, 0), "no elements"),
        (torch.randn(2, 0, 4), "at least one channel"),
    ],
)
def test_bad_input_wrapper(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.bn_stats(x)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.bn_stats_loss(x, torch.zeros(x.shape[1] if x.dim() > 1 else 1),
                          torch.ones(x.shape[1] if x.dim() > 1 else 1))


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(5), "x must have shape"),
        (torch.ones(4, 3, dtype=torch.int32), "x must be float32"),
        (torch.randn(0, 3, 4, 4), "no elements"),
    ],
)
def test_bad_input_kernel(x, match):
    """The compiled op checks its arguments too (for callers of torch.ops directly)."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.exml_fast.bn_stats(x)


def test_bad_running_stats():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        ops.bn_stats_loss(x, torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        ops.bn_stats_loss(x, torch.zeros(3), torch.ones(3, 1))
    with pytest.raises(TypeError, match="running_var must be a floating tensor"):
        ops.bn_stats_loss(x, torch.zeros(3), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="form must be one of"):
        ops.bn_stats_loss(x, torch.zeros(3), torch.ones(3), form="l1")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.bn_stats([[1.0, 2.0]])
    with pytest.raises(RuntimeError, match="grad_var must have shape"):
        torch.ops.exml_fast._bn_stats_backward(torch.zeros(3), torch.zeros(2), x, torch.zeros(3))


@pytest.mark.slow
def test_baseline_cpu_loops_pass_the_same_battery():
    """The CPU loops are built twice (baseline x86-64 and AVX2+FMA+F16C, picked at
    run time); EXML_FAST_CPU_ISA=base forces the baseline build, which must pass
    the same value and gradient checks."""
    import os
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "matches_reference and cpu"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "EXML_FAST_CPU_ISA": "base"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


# -- frozen_bn_stats: an eval-mode BatchNorm fused with its input's statistics --------------


def _scale_shift(c: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(11)
    acc = acc_dtype(dtype)
    scale = (torch.rand(c, generator=g) * 2 - 0.5).to(acc).to(device)
    shift = torch.randn(c, generator=g).to(acc).to(device)
    return scale, shift


def _bshape(x):
    return (1, -1) + (1,) * (x.dim() - 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", case_ids())
def test_frozen_forward_matches_reference(device, dtype, case):
    x = dict(sample_inputs(device, dtype))[case]
    scale, shift = _scale_shift(x.shape[1], device, dtype)
    y, mean, var = ops.frozen_bn_stats(x, scale, shift)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.dim() >= 4 and x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                        else torch.channels_last_3d) and not x.is_contiguous():
        assert not y.is_contiguous()  # the layout is kept
    # The statistics are bn_stats' own (same kernel, same partition): bit for bit.
    m2, v2 = ops.bn_stats(x)
    assert torch.equal(mean, m2) and torch.equal(var, v2)
    # y = x * scale + shift in the accumulation dtype, rounded once to x's dtype.
    truth = _ld(x) * _ld(scale).reshape(_bshape(x)) + _ld(shift).reshape(_bshape(x))
    want = ref.frozen_bn_stats(x, scale, shift)[0]
    assert_as_accurate_as_torch(y, want, truth, dtype, extra_slack=eps_of(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", case_ids())
def test_frozen_backward_matches_reference(device, dtype, case):
    x = dict(sample_inputs(device, dtype))[case]
    c = x.shape[1]
    scale, shift = _scale_shift(c, device, dtype)
    g = torch.Generator().manual_seed(7)
    gm = torch.randn(c, generator=g).to(device)
    gv = torch.randn(c, generator=g).to(device)
    gy = torch.randn(x.shape, generator=g).to(dtype).to(device)

    def grad_of(fn, inp):
        inp = inp.detach().requires_grad_(True)
        y, m, v = fn(inp, scale, shift)
        (y.float() * gy.float()).sum().add((m * gm.to(m.dtype)).sum()).add((v * gv.to(v.dtype)).sum()).backward()
        return inp.grad

    dx = grad_of(ops.frozen_bn_stats, x)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    truth = truth_grad(x, gm, gv) + _ld(gy) * _ld(scale).reshape(_bshape(x))
    torch_own = grad_of(ref.frozen_bn_stats, x)
    assert_as_accurate_as_torch(dx, torch_own, truth, dtype, extra_slack=eps_of(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,fmt",
    [((3, 4, 5, 3), None), ((3, 4, 5, 3), torch.channels_last), ((6, 5), None), ((2, 3, 7), None),
     ((2, 2, 3, 2, 3), torch.channels_last_3d)],
)
def test_frozen_gradcheck_float64(device, shape, fmt):
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    x.requires_grad_(True)
    scale, shift = _scale_shift(shape[1], device, torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.frozen_bn_stats(t, scale, shift), (x,))
    # Only some outputs used: autograd passes None for the others.
    assert torch.autograd.gradcheck(lambda t: ops.frozen_bn_stats(t, scale, shift)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: ops.frozen_bn_stats(t, scale, shift)[2], (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_frozen_opcheck(device, dtype):
    for name, x in sample_inputs(device, dtype):
        if name in ("large_c", "large_c_channels_last", "long_runs", "many_rows_channels_last"):
            continue
        scale, shift = _scale_shift(x.shape[1], device, dtype)
        for requires_grad in (False, True):
            xi = x.detach().clone(memory_format=torch.preserve_format)
            if not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
                xi = x.detach()
            xi.requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.exml_fast.frozen_bn_stats.default, (xi, scale, shift))
        c = x.shape[1]
        acc = acc_dtype(dtype)
        args = (torch.randn(x.shape).to(dtype).to(device), torch.randn(c, dtype=acc, device=device),
                torch.randn(c, dtype=acc, device=device), x.detach(), torch.randn(c, dtype=acc, device=device),
                scale)
        torch.library.opcheck(
            torch.ops.exml_fast._frozen_bn_stats_backward.default, args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_grad_y_in_another_layout(device):
    """grad_y laid out differently from x (autograd may hand either) gives the same dx."""
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, device=device).to(memory_format=torch.channels_last)
    scale, shift = _scale_shift(6, device, torch.float64)
    mean = ops.bn_stats(x)[0]
    gy = torch.randn(4, 6, 5, 5, dtype=torch.float64, device=device)
    gm = torch.randn(6, dtype=torch.float64, device=device)
    gv = torch.randn(6, dtype=torch.float64, device=device)
    a = torch.ops.exml_fast._frozen_bn_stats_backward(gy, gm, gv, x, mean, scale)
    b = torch.ops.exml_fast._frozen_bn_stats_backward(gy.to(memory_format=torch.channels_last), gm, gv, x,
                                                      mean, scale)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_double_backward_refused():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    scale, shift = _scale_shift(3, "cpu", torch.float64)
    y, m, v = ops.frozen_bn_stats(x, scale, shift)
    (g,) = torch.autograd.grad(y.square().sum() + v.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_frozen_compile_fullgraph():
    torch._dynamo.reset()
    scale, shift = _scale_shift(8, "cpu", torch.float32)

    def step(x):
        y, m, v = ops.frozen_bn_stats(x, scale, shift)
        return y.relu().mean() + m.square().sum() + v.sum()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    y, m, v = ref.frozen_bn_stats(x2, scale, shift)
    expected = y.relu().mean() + m.square().sum() + v.sum()
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-7)


def test_frozen_bad_input():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"frozen_bn_stats: scale must have shape \(3,\)"):
        ops.frozen_bn_stats(x, torch.ones(4), torch.zeros(3))
    with pytest.raises(TypeError, match="frozen_bn_stats: shift must be a floating tensor"):
        ops.frozen_bn_stats(x, torch.ones(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be float32"):
        ops.frozen_bn_stats(x.long(), torch.ones(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="scale must be Float"):
        torch.ops.exml_fast.frozen_bn_stats(x, torch.ones(3, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        torch.ops.exml_fast._frozen_bn_stats_backward(torch.ones(4, 3, 5, 4), torch.zeros(3), torch.zeros(3), x,
                                                       torch.zeros(3), torch.ones(3))


def test_bn_module_output_equals_fused_y():
    """y is what an eval-mode nn.BatchNorm2d computes (the matcher substitutes one for the other)."""
    from exml_fast.reference.bn_stats import frozen_bn_scale_shift

    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-1, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(5, 6, 7, 7)
    scale, shift = frozen_bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, torch.float32)
    y = ops.frozen_bn_stats(x, scale, shift)[0]
    torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=1e-6)



# -- CUDA kernel paths: vectorised and scalar loops, tiles, one- and two-level finalisation --------------

# (name, shape, memory format, storage offset in elements). The CUDA kernels load 16-byte vectors along
# NCHW rows when S is a multiple of the vector and x is aligned (S = 64 or 160: vectorised; 49, 13, an odd
# S or a storage offset of one element: the scalar loop), and 2 channels a lane (fp64: 1) across
# channels_last rows when C is even and x aligned. Blocks split a channel (tile) when there are few of
# them; more than 32 parts per channel (the "two_level" cases, on any GPU with 17 SMs or more) takes the
# second merge level, and C >= 8 * SMs (the c1000 cases on H100/H200: 1056 blocks a wave) none.
CUDA_PATH_CASES = [
    ("rows_vec", (4, 6, 8, 8), None, 0),
    ("rows_7x7", (3, 5, 7, 7), None, 0),
    ("rows_offset", (4, 6, 8, 8), None, 1),
    ("rows_batch1", (1, 3, 17, 19), None, 0),
    ("rows_c1000", (2, 1000, 4, 4), None, 0),
    ("rows_c1100", (2, 1100, 4, 4), None, 0),
    ("rows_two_level", (4, 2, 130, 130), None, 0),
    ("rows_two_level_odd", (2, 1, 181, 183), None, 0),
    ("3d_odd", (7, 5, 13), None, 0),
    ("5d_vec", (2, 3, 4, 5, 8), None, 0),
    ("cl_c64", (4, 64, 8, 8), torch.channels_last, 0),
    ("cl_c33", (5, 33, 6, 7), torch.channels_last, 0),
    ("cl_c1000", (2, 1000, 3, 3), torch.channels_last, 0),
    ("cl_offset", (4, 64, 8, 8), torch.channels_last, 1),
    ("cl_c1_7x7", (3, 1, 7, 7), torch.channels_last, 0),
    ("cl_two_level_c3", (4, 3, 128, 128), torch.channels_last, 0),
    ("cl_two_level_c2", (8, 2, 96, 96), torch.channels_last, 0),
    ("cl_tiles_and_parts", (16, 64, 32, 32), torch.channels_last, 0),
    ("cl_5d", (2, 8, 4, 6, 6), torch.channels_last_3d, 0),
    ("spatial1x1_c1000", (3, 1000, 1, 1), None, 0),
    ("2d_c3", (1000, 3), None, 0),
    ("2d_c64_offset", (4096, 64), None, 1),
]


def _with_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values in a tensor with t's strides whose data starts `offset` elements into its storage
    (misaligned for vector loads when offset is odd)."""
    if offset == 0:
        return t
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    return torch.as_strided(flat, t.shape, t.stride(), storage_offset=offset).copy_(t)


def cuda_path_input(case: str, dtype: torch.dtype) -> torch.Tensor:
    _, shape, fmt, offset = next(c for c in CUDA_PATH_CASES if c[0] == case)
    g = torch.Generator().manual_seed(sum(shape) + len(case))
    x = (torch.randn(*shape, generator=g) * 1.5 + 0.25).to(dtype)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    x = _with_offset(x.cuda(), offset)
    assert x.storage_offset() == offset
    return x


def _other_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t's values, dense, with strides other than like's."""
    o = t.mT.contiguous().mT
    return o if o.stride() != like.stride() else t.contiguous()


def _assert_close_to(ours, other, rounding_dtype, scale, factor=4):
    """|ours - other| <= factor * eps(rounding_dtype) * (|other| + max|scale|): the two sides differ by
    a few roundings to `rounding_dtype` (FMA contraction, summation order)."""
    eps = eps_of(rounding_dtype)
    torch.testing.assert_close(ours.cpu(), other.cpu(), rtol=factor * eps,
                               atol=factor * eps * max(float(scale.abs().max()), 1e-30))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c[0] for c in CUDA_PATH_CASES])
def test_cuda_paths_matches_reference(dtype, case):
    """bn_stats and frozen_bn_stats, forward and backward, through every CUDA loop and merge path: as
    accurate as PyTorch in that dtype against the long-double truth, close to the CPU kernels, x's
    layout kept, bit-for-bit repeatable."""
    x = cuda_path_input(case, dtype)
    xc = x.cpu()  # same strides, no offset
    c, acc = x.shape[1], acc_dtype(dtype)

    mean, var = torch.ops.exml_fast.bn_stats(x)
    assert mean.dtype == acc and mean.shape == (c,) and mean.is_cuda
    truth_m, truth_v = truth_stats(xc)
    torch_m, torch_v = ref.bn_stats(x)
    assert_as_accurate_as_torch(mean, torch_m, truth_m, dtype)
    assert_as_accurate_as_torch(var, torch_v, truth_v, dtype)
    cpu_m, cpu_v = torch.ops.exml_fast.bn_stats(xc)
    spread = cpu_m.abs() + cpu_v.sqrt()
    _assert_close_to(mean, cpu_m, acc, spread, factor=16)
    _assert_close_to(var, cpu_v, acc, cpu_v, factor=16)
    m2, v2 = torch.ops.exml_fast.bn_stats(x)
    assert torch.equal(mean, m2) and torch.equal(var, v2)  # a fixed merge order

    scale, shift = _scale_shift(c, "cuda", dtype)
    y, fm, fv = torch.ops.exml_fast.frozen_bn_stats(x, scale, shift)
    assert torch.equal(fm, mean) and torch.equal(fv, var)  # one partition, one method
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    truth_y = _ld(xc) * _ld(scale).reshape(_bshape(x)) + _ld(shift).reshape(_bshape(x))
    assert_as_accurate_as_torch(y, ref.frozen_bn_stats(x, scale, shift)[0], truth_y, dtype,
                                extra_slack=eps_of(dtype))
    cpu_y = torch.ops.exml_fast.frozen_bn_stats(xc, scale.cpu(), shift.cpu())[0]
    _assert_close_to(y, cpu_y, dtype, cpu_y)

    g = torch.Generator().manual_seed(5)
    gm, gv = torch.randn(c, generator=g, dtype=acc), torch.randn(c, generator=g, dtype=acc)
    gy = torch.empty_like(xc).copy_(torch.randn(x.shape, generator=g))  # x's layout
    dx = torch.ops.exml_fast._bn_stats_backward(gm.cuda(), gv.cuda(), x, cpu_m.cuda())
    assert dx.dtype == dtype and dx.stride() == x.stride()
    cpu_dx = torch.ops.exml_fast._bn_stats_backward(gm, gv, xc, cpu_m)
    _assert_close_to(dx, cpu_dx, dtype, cpu_dx)
    cpu_fdx = torch.ops.exml_fast._frozen_bn_stats_backward(gy, gm, gv, xc, cpu_m, scale.cpu())
    truth_dx = truth_grad(xc, gm, gv) + _ld(gy) * _ld(scale).reshape(_bshape(x))
    # grad_y in x's layout, misaligned, and in another layout (copied to x's first).
    for gy_dev in (gy.cuda(), _with_offset(gy.cuda(), 1), _other_layout(gy, xc).cuda()):
        fdx = torch.ops.exml_fast._frozen_bn_stats_backward(gy_dev, gm.cuda(), gv.cuda(), x, cpu_m.cuda(),
                                                            scale)
        assert fdx.dtype == dtype and fdx.stride() == x.stride()
        _assert_close_to(fdx, cpu_fdx, dtype, cpu_fdx)
        # The kernels take the CPU kernel's mean, truth_grad the exact one: equally accurate, nearly equal.
        assert_as_accurate_as_torch(fdx, cpu_fdx, truth_dx, dtype, extra_slack=eps_of(dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "channels_last"])
def test_cuda_graph_capture_and_streams(fmt):
    """The per-call workspace and its zeroed counters make the kernels safe to capture in a CUDA graph
    and to run on two streams at once: replays and concurrent calls give the eager results."""
    def run(x, scale, shift, gy, gm, gv):
        y, m, v = torch.ops.exml_fast.frozen_bn_stats(x, scale, shift)
        dx = torch.ops.exml_fast._frozen_bn_stats_backward(gy, gm, gv, x, m, scale)
        return y, m, v, dx, *torch.ops.exml_fast.bn_stats(x)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 3, 64, 64, generator=g) * 2 + 1  # several blocks per channel
        if fmt is not None:
            x = x.to(memory_format=fmt)
        return [t.cuda() for t in (x, *_scale_shift(3, "cpu", torch.float32), torch.randn(x.shape, generator=g),
                                   torch.randn(3, generator=g), torch.randn(3, generator=g))]

    a, b = inputs(1), inputs(2)
    want_a, want_b = run(*a), run(*b)
    static = [t.clone(memory_format=torch.preserve_format) for t in a]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(*static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(*static)
    for src, want in ((b, want_b), (a, want_a), (b, want_b)):
        for t, s in zip(static, src):
            t.copy_(s)
        graph.replay()
        for o, w in zip(out, want):
            assert torch.equal(o, w)

    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    s1.wait_stream(torch.cuda.current_stream())
    s2.wait_stream(torch.cuda.current_stream())
    results = {}
    for _ in range(3):
        with torch.cuda.stream(s1):
            results["a"] = run(*a)
        with torch.cuda.stream(s2):
            results["b"] = run(*b)
    torch.cuda.synchronize()
    for key, want in (("a", want_a), ("b", want_b)):
        for o, w in zip(results[key], want):
            assert torch.equal(o, w)
