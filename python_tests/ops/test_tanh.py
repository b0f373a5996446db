"""exml_fast.ops.tanh (and fast_tanh, fast_layers) against torch.tanh.

Tolerances. The CPU kernel's float32 tanh is an approximation proven here within 2 ulp of the exact
tanh (float64 tanh rounded to float32) on a dense sample of every float32 binade, so float32 results are
compared at 2 ulp of the exact value, not against PyTorch's own float32 result (within 1 ulp of exact
itself: the two may differ by 3). float16 and bfloat16 are computed in float32 and rounded once, as
PyTorch does: at most one rounding step of the 16-bit dtype apart (rtol eps). float64 is the C
library's tanh against PyTorch's (both within about an ulp: rtol 2 eps). The gradient is
grad * (1 - y^2) from the op's own output, PyTorch's formula, so it is compared given the same y at the
dtype's rounding.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from _util import DEVICES, DTYPES, eps_of, requires_ops
from torch import nn

from exml_fast.models import build_model
from exml_fast.ops.fast_layers import fast_layers
from exml_fast.ops.tanh import fast_tanh, tanh

pytestmark = requires_ops

# The module (exml_fast.ops re-exports its function under the same name).
tanh_mod = importlib.import_module("exml_fast.ops.tanh")

CL = torch.channels_last


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 whose order and differences are those of the floats (ulp distance)."""
    i = x.view(torch.int32).to(torch.int64)
    return torch.where(i < 0, -(i & 0x7FFFFFFF), i)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_ordered(a) - _ordered(b)).abs()


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(ulp_distance(a, b).max()) if a.numel() else 0


def exact_float32(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x.double()).float()


def inputs(device, dtype):
    """(name, x): values over tanh's whole range, channels_last, non-contiguous, 0-d, empty, N = 1."""
    g = torch.Generator().manual_seed(11)

    def randn(*shape, scale=3.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    return [
        ("nchw", randn(3, 4, 7, 9)),
        ("channels_last", randn(2, 5, 6, 4).contiguous(memory_format=CL)),
        ("strided", randn(4, 10)[:, ::3]),
        ("transposed", randn(6, 5).t()),
        ("small", randn(257, scale=0.3)),
        ("large", randn(33, scale=12.0)),
        ("scalar", randn(())),
        ("one", randn(1, 3)),
        ("empty", randn(0, 4)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_values_and_gradients(device, dtype):
    for name, x in inputs(device, dtype):
        a = x.clone().requires_grad_(True)
        y = tanh(a)
        assert y.shape == x.shape and y.dtype == dtype, name
        if x.is_contiguous(memory_format=CL) and not x.is_contiguous():
            assert y.is_contiguous(memory_format=CL), name
        if dtype == torch.float32:
            assert max_ulp(y.detach().cpu(), exact_float32(x.cpu())) <= 2, name
        else:
            rtol = 2 * eps_of(dtype) if dtype == torch.float64 else eps_of(dtype)
            torch.testing.assert_close(y, torch.tanh(x), rtol=rtol, atol=eps_of(dtype) * 1e-3,
                                       msg=lambda m: f"{name}: {m}")
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
        y.backward(grad)
        # given the op's y: 1 - y*y rounded in the op-math dtype (an absolute error of eps, which the
        # cancellation near |y| = 1 does not shrink), times grad, rounded once to the dtype (to its
        # subnormal spacing, tiny * eps, where the result underflows)
        y64, g64 = y.detach().double(), grad.double()
        want = g64 * (1 - y64 * y64)
        eps = eps_of(dtype)
        op_eps = eps_of(torch.float64 if dtype == torch.float64 else torch.float32)
        bound = 2 * op_eps * g64.abs() + eps * want.abs() + torch.finfo(dtype).tiny * eps
        err = (a.grad.double() - want).abs()
        assert bool((err <= bound).all()), f"{name} grad: worst excess {float((err - bound).max())}"


@pytest.mark.parametrize("device", DEVICES)
def test_float32_within_two_ulp_of_exact_tanh_on_every_binade(device):
    """Every 61st float32 bit pattern of [0, inf): 35 M values, each binade densely; negatives by symmetry."""
    bits = torch.arange(0, 0x7F800000, 61, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    y = tanh(x.to(device)).cpu()
    d = ulp_distance(y, exact_float32(x))
    worst = int(d.argmax())
    assert int(d[worst]) <= 2, f"{int(d[worst])} ulp at x = {float(x[worst])!r}"
    torch.testing.assert_close(tanh(-x.to(device)).cpu(), -y, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(device, dtype):
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 30.0, -30.0], dtype=dtype,
                     device=device)
    y = tanh(x).cpu()
    torch.testing.assert_close(y, torch.tensor([0.0, -0.0, 1.0, -1.0, float("nan"), 1.0, -1.0], dtype=dtype),
                               rtol=0, atol=0, equal_nan=True)
    assert torch.signbit(y[1]) and not torch.signbit(y[0])
    tiny = torch.tensor([1e-40, -1e-30], dtype=torch.float32, device=device)  # subnormal, and x^3 underflows
    torch.testing.assert_close(tanh(tiny), tiny, rtol=0, atol=0)


def test_gradcheck_float64():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tanh, (x,))


def test_double_backward_raises():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(tanh(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()


def test_no_graph_under_no_grad():
    x = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        assert not tanh(x).requires_grad


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tanh([0.5])
    with pytest.raises(TypeError, match="x must be float32"):
        tanh(torch.arange(3))
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.exml_fast.tanh(torch.arange(3))
    y = torch.rand(2, 3)
    with pytest.raises(RuntimeError, match="grad must have y's shape"):
        torch.ops.exml_fast._tanh_backward(torch.rand(3, 2), y)
    with pytest.raises(RuntimeError, match="grad must have y's dtype"):
        torch.ops.exml_fast._tanh_backward(y.double(), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    x = torch.randn(2, 3, 5, 4, dtype=dtype, device=device)
    for xi in (x, x.contiguous(memory_format=CL), x[..., ::2]):
        torch.library.opcheck(torch.ops.exml_fast.tanh.default, (xi.detach().requires_grad_(True),))
        g = torch.randn(xi.shape, dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.exml_fast._tanh_backward.default, (g, torch.tanh(xi)))


def test_torch_compile_traces_the_op():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    f = torch.compile(lambda t: tanh(t) * 2, backend="aot_eager", fullgraph=True)
    y = f(x)
    y.sum().backward()
    torch.testing.assert_close(y, torch.tanh(x) * 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, 2 * (1 - torch.tanh(x) ** 2), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_every_cpu_build_passes_the_same_battery(isa):
    """The CPU loops are built for baseline x86-64, AVX2 and AVX-512 (the widest the CPU has runs);
    EXML_FAST_CPU_ISA caps the choice, so each build runs the value, ulp and special-value tests."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "(matches_reference or every_binade or special_values) and cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "EXML_FAST_CPU_ISA": isa},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def _fused(y: torch.Tensor) -> bool:
    """Whether y came from the fused op (its autograd node, csrc/ops/tanh.cpp), not torch.tanh."""
    return "exml_fast" in y.grad_fn.name() and "TanhFunction" in y.grad_fn.name()


def test_fast_tanh_leaves_a_lenet_close_and_restores_it():
    torch.manual_seed(0)
    model = build_model("lenet5")
    x = torch.randn(8, 1, 32, 32)
    acts = [m for m in model.modules() if type(m) is nn.Tanh]
    assert len(acts) == 4

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_grads = run()
    with fast_tanh(model):
        assert all("forward" in m.__dict__ for m in acts)
        with fast_tanh(model):  # nested: the inner block leaves the outer's patch alone
            pass
        assert all("forward" in m.__dict__ for m in acts)
        got, got_grads = run()
        assert _fused(acts[0](torch.randn(3, requires_grad=True)))
    assert not any("forward" in m.__dict__ for m in acts)
    # a few ulp per tanh, through four layers and their gradients
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fast_tanh_takes_the_op_on_the_cpu_only_for_exact_nn_tanh(monkeypatch):
    class MyTanh(nn.Tanh):
        pass

    model = nn.Sequential(nn.Tanh(), MyTanh(), nn.Sigmoid())
    with fast_tanh(model):
        assert ["forward" in m.__dict__ for m in model] == [True, False, False]
        x = torch.randn(5, requires_grad=True)
        assert _fused(model[0](x)) and _fused(model[0](x.double()))
        assert model[0](torch.arange(3)).grad_fn is None  # integer input: nn.Tanh's own forward
    monkeypatch.setattr(tanh_mod, "FAST_TANH", False)
    with fast_tanh(model):
        assert not any("forward" in m.__dict__ for m in model)


def test_fast_tanh_restores_after_an_exception():
    act = nn.Tanh()
    with pytest.raises(KeyError):
        with fast_tanh(act):
            raise KeyError("boom")
    assert "forward" not in act.__dict__


def test_fast_layers_swaps_pooling_and_tanh_and_skips_none():
    model = build_model("lenet5")
    swapped = [m for m in model.modules() if type(m) in (nn.Tanh, nn.AvgPool2d, nn.MaxPool2d)]
    with fast_layers(model, None):
        assert swapped and all("forward" in m.__dict__ for m in swapped)
    assert not any("forward" in m.__dict__ for m in model.modules())
