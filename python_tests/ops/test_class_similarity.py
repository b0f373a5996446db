"""exml_fast.ops.class_similarity against exml_fast.reference.class_similarity.

Values and gradients against the fp64 reference as truth; in each dtype the fused op must be at least as accurate
as the reference run in that dtype, up to a factor of 2 plus a few units of the compute dtype.
"""

from __future__ import annotations

import pytest
import torch
from _util import DEVICES, DTYPES, acc_dtype, assert_cpp_autograd, eps_of, requires_ops

from exml_fast.ops.class_similarity import class_similarity
from exml_fast.reference.class_similarity import class_similarity as ref_class_similarity

pytestmark = requires_ops


# -- class_similarity ----------------------------------------------------------------


def weight_cases(device: str, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    dup = torch.randn(6, 9, generator=g)
    dup[4] = dup[1]  # tied maxima in rows 1 and 4
    return [
        ("lenet", randn(10, 84, scale=0.1)),
        ("odd", randn(37, 13)),
        ("large_k", randn(300, 64)),  # BLAS path of the CPU kernel
        ("k1", randn(1, 7)),
        ("k2", randn(2, 3)),
        ("h1", randn(5, 1)),  # similarities are +-1: ties at both ends
        ("transposed", randn(20, 11).t()),
        ("sliced", randn(12, 40)[::2, 3:]),
        ("duplicate_rows", dup.to(dtype).to(device)),
    ]


def case_ids():
    return [n for n, _ in weight_cases("cpu", torch.float32)]


def _err(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0


def assert_as_accurate(ours, torch_own, truth, dtype, amplification=1.0, scale=0.0):
    """max|ours - truth| <= 2 max|torch_own - truth| + 16 eps amplification scale, where
    scale is the larger of max|truth| and the caller's natural scale of the values."""
    scale = max(float(truth.detach().abs().max()), scale, 1e-30)
    slack = 16 * eps_of(acc_dtype(dtype)) * amplification * scale
    ours, torch_own, truth = ours.detach(), torch_own.detach(), truth.detach()
    e_ours, e_torch = _err(ours, truth), _err(torch_own, truth)
    assert e_ours <= 2 * e_torch + slack, f"error {e_ours:.3e} > 2 x torch's {e_torch:.3e} + {slack:.3e}"


def _amplification(w: torch.Tensor) -> float:
    """1 / smallest row range of the similarity: min-max scaling magnifies
    rounding errors of S by it, in ours and in torch's alike."""
    n = torch.nn.functional.normalize(w.double().cpu(), dim=1)
    s = n @ n.T
    r = (s.amax(1) - s.amin(1)).clamp_min(1e-3)
    return float(1 / r.min())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", case_ids())
def test_class_similarity_matches_reference(device, dtype, case):
    w = dict(weight_cases(device, dtype))[case]
    floor = 0.05
    wa = w.detach().clone().requires_grad_(True)
    out = class_similarity(wa, floor=floor)
    k = w.shape[0]
    assert out.shape == (k, k) and out.dtype == acc_dtype(dtype) and out.device == w.device
    assert float(out.detach().min()) >= floor and float(out.detach().max()) <= 1.0
    assert torch.all(out.diagonal() == 1)
    wt = w.detach().double().requires_grad_(True)
    truth = ref_class_similarity(wt, floor=floor)
    wr = w.detach().clone().requires_grad_(True)
    torch_own = ref_class_similarity(wr, floor=floor)
    amp = _amplification(w)
    assert_as_accurate(out, torch_own, truth, dtype, amp)
    gout = torch.randn(k, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (gw,) = torch.autograd.grad(out, wa, gout.to(out.dtype).to(device))
    (gt,) = torch.autograd.grad(truth, wt, gout.to(device))
    (gr,) = torch.autograd.grad(torch_own, wr, gout.to(torch_own.dtype).to(device))
    assert gw.dtype == w.dtype and gw.shape == w.shape
    # Natural scale of dw: |grad_out| / |w| (every term of the chain rule has it).
    grad_scale = float(gout.abs().max()) / float(w.double().norm(dim=1).min())
    assert_as_accurate(gw, gr, gt, dtype, amp**2 * k + eps_of(dtype) / eps_of(acc_dtype(dtype)),
                       scale=grad_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,floor", [((6, 4), 1e-4), ((9, 5), 0.3), ((3, 2), 0.5)])
def test_class_similarity_gradcheck(device, shape, floor):
    w = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: class_similarity(t, floor=floor), (w,))


@pytest.mark.parametrize("device", DEVICES)
def test_class_similarity_constant_rows(device):
    # K = 1, and rows of parallel vectors (every similarity 1): all ones, zero gradient.
    for w in (torch.randn(1, 5), torch.randn(1, 3).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])):
        w = w.to(device).requires_grad_(True)
        out = class_similarity(w)
        assert torch.equal(out, torch.ones_like(out))
        (g,) = torch.autograd.grad(out.sum(), w)
        assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0
        assert torch.equal(ref_class_similarity(w.detach()), out.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_class_similarity_zero_row_and_empty(device):
    w = torch.randn(4, 3, device=device)
    w[2] = 0
    if device == "cpu":
        with pytest.raises(RuntimeError, match="row 2 of weight is all zeros"):
            class_similarity(w)
        with pytest.raises(RuntimeError, match="row 2 of weight is all zeros"):
            ref_class_similarity(w)
    else:  # not checked (a host sync): the whole output is NaN
        assert torch.isnan(class_similarity(w)).all()
    for fn in (class_similarity, ref_class_similarity):
        e = torch.randn(0, 5, device=device, requires_grad=True)
        out = fn(e)
        assert out.shape == (0, 0) and out.dtype == torch.float32
        out.sum().backward()
        assert e.grad.shape == (0, 5)


def test_class_similarity_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        class_similarity(torch.randn(3))
    with pytest.raises(TypeError, match="float32"):
        class_similarity(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="floor"):
        class_similarity(torch.randn(3, 3), floor=0.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        class_similarity([[1.0, 2.0]])
    with pytest.raises(RuntimeError, match="2-D"):  # the C++ check, for direct callers
        torch.ops.exml_fast.class_similarity(torch.randn(3), 1e-4)


def test_class_similarity_autograd_is_registered_in_cpp():
    """On CPU the op's and its backward op's autograd nodes are the C++ ones of csrc/ops/class_similarity.cpp,
    not Python autograd nodes (which would cost more per call than the kernel)."""
    w = torch.randn(10, 84, dtype=torch.float64, requires_grad=True)
    out = class_similarity(w)
    assert_cpp_autograd(out, "ClassSimilarityFunction")
    (g,) = torch.autograd.grad(out.sum(), w, create_graph=True)
    assert_cpp_autograd(g, "ClassSimilarityBackwardFunction")
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    _, sim = torch.ops.exml_fast.class_similarity(w, 1e-4)
    assert sim.grad_fn is None and not sim.requires_grad  # the auxiliary output


def test_class_similarity_opcheck():  # the compiled op has a CPU kernel only (on CUDA: the reference)
    device = "cpu"
    for name, w in weight_cases(device, torch.float32):
        if name == "large_k":
            continue
        for rg in (False, True):
            torch.library.opcheck(torch.ops.exml_fast.class_similarity.default,
                                  (w.detach().clone().requires_grad_(rg), 1e-4))
    w = torch.randn(7, 5, device=device)
    sim = torch.ops.exml_fast.class_similarity(w, 1e-4)[1]
    torch.library.opcheck(torch.ops.exml_fast._class_similarity_backward.default,
                          (torch.randn(7, 7, device=device), w, sim, 1e-4),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_class_similarity_compile_fullgraph():
    torch._dynamo.reset()
    w = torch.randn(10, 84, requires_grad=True)
    y = torch.randint(0, 10, (16,))

    def f(w, y):
        return (class_similarity(w)[y] * 10.0).sum()

    out = torch.compile(f, fullgraph=True)(w, y)
    (g,) = torch.autograd.grad(out, w)
    expect = f(w, y)
    (ge,) = torch.autograd.grad(expect, w)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(g, ge)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_class_similarity_cuda_runs_the_reference_without_host_sync():
    """On CUDA the wrapper runs the reference composite (PyTorch's GEMM, row reductions and autograd) and never
    syncs the host, zero rows included; it agrees with the CPU kernel."""
    w = torch.randn(10, 84, generator=torch.Generator().manual_seed(0)) * 0.1
    gout = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    wc, gc = w.cuda().requires_grad_(True), gout.cuda()
    zero = torch.zeros(4, 3, device="cuda")
    zero[0, 0], zero[1, 1], zero[3, 2] = 1.0, 1.0, 1.0  # row 2 stays zero
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = class_similarity(wc)
        (g,) = torch.autograd.grad(out, wc, gc)
        nan_out = class_similarity(zero)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert "exml_fast" not in out.grad_fn.name()  # PyTorch's own autograd nodes
    assert torch.isnan(nan_out).all()
    wcpu = w.clone().requires_grad_(True)
    ocpu = class_similarity(wcpu)
    (gcpu,) = torch.autograd.grad(ocpu, wcpu, gout)
    torch.testing.assert_close(out.cpu(), ocpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.cpu(), gcpu, rtol=1e-4, atol=1e-5)
