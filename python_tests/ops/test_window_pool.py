"""exml_fast.ops.window_pool (and fast_pooling) against PyTorch's F.max_pool2d / F.avg_pool2d.

Max pooling only selects elements and its gradient only routes them, so values and gradients are
compared exactly (NaN positions included) in every dtype. The mean is compared at the dtype's rounding:
the kernel sums the window in the accumulation dtype in the same row-major order as PyTorch's CPU
kernel and divides by kh * kw, so fp32/fp64 agree to an ulp or so (rtol 4 eps of the dtype); 16-bit
inputs are summed in float32 by both, then rounded once (rtol 2 eps of the dtype).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _util import DEVICES, DTYPES, eps_of, requires_ops
from torch import nn

from exml_fast.models import build_model
from exml_fast.ops.window_pool import fast_pooling, window_pool
from exml_fast.reference.window_pool import window_pool as ref_window_pool

pytestmark = requires_ops

# The module (exml_fast.ops re-exports its function under the same name).
window_pool_mod = importlib.import_module("exml_fast.ops.window_pool")

CL = torch.channels_last
KERNELS = [(2, 2), (3, 3), (2, 3), (1, 1), (4, 2)]


def inputs(device, dtype):
    """(name, x): ties (values on a 0.5 grid), odd sizes with tail rows/columns, channels_last,
    non-contiguous, one channel, a single window."""
    g = torch.Generator().manual_seed(7)

    def grid(*shape):
        return (torch.randint(-4, 5, shape, generator=g).float() / 2).to(dtype).to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    return [
        ("nchw", randn(3, 4, 12, 12)),
        ("ties", grid(2, 3, 8, 9)),
        ("odd_tail", randn(2, 3, 13, 11)),
        ("channels_last", randn(2, 5, 12, 10).contiguous(memory_format=CL)),
        ("ties_channels_last", grid(2, 6, 9, 8).contiguous(memory_format=CL)),
        ("strided", randn(2, 3, 12, 20)[..., ::2]),
        ("one_channel", randn(4, 1, 6, 6)),
        ("single_window", randn(2, 2, 4, 3)),
        ("empty_batch", randn(0, 3, 6, 6)),
    ]


def _tol(dtype, mode):
    if mode == "max":
        return dict(rtol=0, atol=0)
    eps = eps_of(dtype)
    return dict(rtol=(2 if dtype in (torch.float16, torch.bfloat16) else 4) * eps, atol=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference_values_and_gradients(device, dtype, mode, kernel):
    for name, x in inputs(device, dtype):
        if x.shape[2] < kernel[0] or x.shape[3] < kernel[1]:
            continue
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        ya = window_pool(a, kernel, mode=mode)
        yb = ref_window_pool(b, kernel, mode)
        torch.testing.assert_close(ya, yb, **_tol(dtype, mode), msg=lambda m: f"{name}: {m}")
        if x.is_contiguous(memory_format=CL) and not x.is_contiguous():
            assert ya.is_contiguous(memory_format=CL), name
        grad = torch.randn(yb.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(a.grad, b.grad, **_tol(dtype, mode), msg=lambda m: f"{name} grad: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_max_nan_and_infinity_follow_pytorch(device, fmt):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[[[1.0, nan, 2.0, 2.0], [nan, 0.0, 2.0, 1.0], [-inf, -inf, inf, 3.0], [-inf, -inf, 1.0, inf]]]],
                     device=device).repeat(2, 3, 1, 1).contiguous(memory_format=fmt)
    a = x.clone().requires_grad_(True)
    # The reference is PyTorch on the NCHW copy: its CUDA channels_last kernel (torch 2.11, H100) loses
    # the gradient of the all -inf window, where its CPU kernels and its NCHW CUDA kernel give it to
    # the window's first element, as window_pool does in both layouts.
    b = x.contiguous().requires_grad_(True)
    ya, yb = window_pool(a, 2), F.max_pool2d(b, 2)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        window_pool(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="x must be float32"):
        window_pool(x.to(torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        window_pool(x.numpy())
    with pytest.raises(ValueError, match="kernel_size"):
        window_pool(x, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        window_pool(x, (2, 2, 2))
    with pytest.raises(ValueError, match="mode"):
        window_pool(x, 2, mode="min")
    with pytest.raises(ValueError, match="at least one window"):
        window_pool(x, 9)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.exml_fast._window_pool_backward(torch.randn(2, 3, 3, 4), x, 2, 2, True)


def test_double_backward_raises():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(window_pool(x, 2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    x = torch.randn(2, 3, 7, 9, dtype=dtype, device=device)
    for xi in (x, x.contiguous(memory_format=CL)):
        for is_max in (True, False):
            torch.library.opcheck(torch.ops.exml_fast.window_pool.default, (xi.requires_grad_(True), 2, 3, is_max))
            g = torch.randn(2, 3, 3, 3, dtype=dtype, device=device)
            torch.library.opcheck(torch.ops.exml_fast._window_pool_backward.default, (g, xi.detach(), 2, 3, is_max))


def test_torch_compile_traces_the_op():
    x = torch.randn(4, 3, 8, 8)
    f = torch.compile(lambda t: window_pool(t, 2, mode="avg") * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), F.avg_pool2d(x, 2) * 2)


@pytest.mark.parametrize("arch", ["lenet5", "lenet5_bn"])
def test_fast_pooling_leaves_a_lenet_unchanged_and_restores_it(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    x = torch.randn(8, 1, 32, 32)
    pools = [m for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert pools

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_grads = run()
    with fast_pooling(model):
        assert all("forward" in m.__dict__ for m in pools)
        with fast_pooling(model):  # nested: the inner block leaves the outer's patch alone
            pass
        assert all("forward" in m.__dict__ for m in pools)
        got, got_grads = run()
    assert not any("forward" in m.__dict__ for m in pools)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fast_pooling_skips_layers_it_cannot_reproduce():
    model = nn.Sequential(nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2, padding=1), nn.AvgPool2d(2, ceil_mode=True),
                          nn.AvgPool2d(2, divisor_override=3), nn.MaxPool2d(2, return_indices=True),
                          nn.MaxPool2d(2), nn.AvgPool2d((2, 3)))
    with fast_pooling(model):
        patched = ["forward" in m.__dict__ for m in model]
    assert patched == [False, False, False, False, False, True, True]


def test_fast_pooling_off_switch_and_fallbacks(monkeypatch):
    pool = nn.MaxPool2d(2)
    monkeypatch.setattr(window_pool_mod, "FAST_POOLING", False)
    with fast_pooling(pool):
        assert "forward" not in pool.__dict__
    monkeypatch.setattr(window_pool_mod, "FAST_POOLING", True)
    x3 = torch.randn(3, 6, 6)  # unbatched: the layer's own forward
    with fast_pooling(pool):
        torch.testing.assert_close(pool(x3), F.max_pool2d(x3, 2))
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with fast_pooling(pool):
        nchw, cl = pool(x), pool(x.contiguous(memory_format=CL))
    pytorch = type(F.max_pool2d(x, 2).grad_fn).__name__
    assert type(nchw.grad_fn).__name__ != pytorch  # the fused op
    assert type(cl.grad_fn).__name__ == pytorch  # channels_last: the layer's own forward
    torch.testing.assert_close(cl, F.max_pool2d(x, 2), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_every_cpu_build_passes_the_same_battery(isa):
    """The CPU loops are built for baseline x86-64, AVX2 and AVX-512 (chosen per layout at run time);
    EXML_FAST_CPU_ISA caps the choice, so each build runs the value, gradient and NaN tests."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "(matches_reference or nan_and_infinity) and cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "EXML_FAST_CPU_ISA": isa},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_fast_pooling_restores_after_an_exception():
    pool = nn.AvgPool2d(2)
    with pytest.raises(KeyError):
        with fast_pooling(pool):
            raise KeyError("boom")
    assert "forward" not in pool.__dict__
