"""exml_fast.ops.bn_match_loss (every layer's BN-statistic loss in one op) against its reference.

Tolerances: both sides sum each layer's squares over at most a few thousand channels; the kernels in
double, rounded once to the statistics' dtype, the reference in that dtype. float32 results agree to a
few ulp of the loss's magnitude (rtol 1e-5), float64 to rounding (rtol 1e-12).
"""

from __future__ import annotations

import pytest
import torch
from _util import CUDA, DEVICES, requires_ops

from exml_fast import BNStatsMatcher
from exml_fast.ops import bn_match_loss
from exml_fast.reference import bn_match_loss as reference_bn_match_loss
from exml_fast.reference.bn_stats import BN_LOSS_FORMS

pytestmark = requires_ops

STAT_DTYPES = [torch.float32, torch.float64]
CHANNELS = [[3], [1, 7, 64], [16] * 20, [2048, 5, 1000], [4] * 50 + [3]]  # 51 layers: two CUDA chunks


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def make(channels, dtype, device, seed=0):
    """Per-layer (mean, var, running_mean, running_var, weight, eps): batch statistics that differ from the
    running ones by a layer-dependent amount, positive variances."""
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("mean", "var", "running_mean", "running_var")}
    for i, c in enumerate(channels):
        s = 0.5 + i % 3
        out["mean"].append(torch.randn(c, generator=g, dtype=torch.float64) * s)
        out["var"].append(torch.rand(c, generator=g, dtype=torch.float64) * s + 0.05)
        out["running_mean"].append(torch.randn(c, generator=g, dtype=torch.float64))
        out["running_var"].append(torch.rand(c, generator=g, dtype=torch.float64) + 0.1)
    out = {k: [t.to(device, dtype) for t in v] for k, v in out.items()}
    weight = [10.0 if i == 0 else 1.0 + 0.25 * (i % 2) for i in range(len(channels))]
    eps = [1e-5 if i % 2 else 1e-3 for i in range(len(channels))]
    return out, weight, eps


def grads_of(fn, stats):
    leaves = [t.detach().clone().requires_grad_(True) for t in stats["mean"] + stats["var"]]
    n = len(stats["mean"])
    loss, terms = fn(leaves[:n], leaves[n:])
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), terms, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", STAT_DTYPES)
@pytest.mark.parametrize("form", BN_LOSS_FORMS)
@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"L{len(c)}")
def test_matches_reference_values_terms_and_gradients(device, dtype, form, channels):
    stats, weight, eps = make(channels, dtype, device)
    rm, rv = stats["running_mean"], stats["running_var"]
    got = grads_of(lambda m, v: bn_match_loss(m, v, rm, rv, weight=weight, eps=eps, form=form,
                                              return_terms=True), stats)
    want = grads_of(lambda m, v: reference_bn_match_loss(m, v, rm, rv, weight=weight, eps=eps, form=form), stats)
    assert got[0].dtype == dtype and got[0].shape == () and got[1].shape == (len(channels), 3)
    torch.testing.assert_close(got[0], want[0], **tol(dtype))
    torch.testing.assert_close(got[1], want[1], **tol(dtype))
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, **tol(dtype))


@pytest.mark.parametrize("form", BN_LOSS_FORMS)
def test_gradcheck_float64(form):
    stats, weight, eps = make([3, 1, 5], torch.float64, "cpu")
    rm, rv = stats["running_mean"], stats["running_var"]
    leaves = [t.clone().requires_grad_(True) for t in stats["mean"] + stats["var"]]
    assert torch.autograd.gradcheck(
        lambda *xs: bn_match_loss(list(xs[:3]), list(xs[3:]), rm, rv, weight=weight, eps=eps, form=form), leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_distance_has_zero_l2_gradient(device):
    """At mean == running_mean the l2 norm has no gradient direction: 0, as torch.linalg.vector_norm gives,
    not NaN."""
    rm = [torch.randn(4, device=device)]
    rv = [torch.rand(4, device=device) + 0.1]
    m = rm[0].clone().requires_grad_(True)
    v = (rv[0] + 1.0).requires_grad_(True)
    loss = bn_match_loss([m], [v], rm, rv, form="l2")
    gm, gv = torch.autograd.grad(loss, [m, v])
    assert torch.equal(gm, torch.zeros_like(gm))
    torch.testing.assert_close(gv, torch.full_like(gv, 0.5))  # (v - rv) / ||v - rv|| with v - rv = 1
    torch.testing.assert_close(loss, torch.tensor(2.0, device=device))


def test_weights_and_eps_as_one_number_and_running_stats_cast():
    stats, _, _ = make([3, 4], torch.float32, "cpu")
    rm16 = [t.half() for t in stats["running_mean"]]
    rv16 = [t.half() for t in stats["running_var"]]
    got = bn_match_loss(stats["mean"], stats["var"], rm16, rv16, weight=2.0, eps=1e-3, form="sq_std")
    want, _ = reference_bn_match_loss(stats["mean"], stats["var"], [t.float() for t in rm16],
                                      [t.float() for t in rv16], weight=[2.0, 2.0], eps=[1e-3, 1e-3],
                                      form="sq_std")
    torch.testing.assert_close(got, want)


def test_running_stats_get_no_gradient_and_only_needed_inputs_do():
    stats, weight, eps = make([3, 4], torch.float32, "cpu")
    rm = [t.clone().requires_grad_(True) for t in stats["running_mean"]]
    m = [t.clone().requires_grad_(True) for t in stats["mean"]]
    loss = bn_match_loss(m, stats["var"], rm, stats["running_var"], weight=weight, eps=eps)
    loss.backward()
    assert all(t.grad is not None for t in m)
    assert all(t.grad is None for t in rm)


def test_autograd_is_cpp_and_double_backward_is_refused():
    stats, weight, eps = make([3, 4], torch.float64, "cpu")
    m = [t.clone().requires_grad_(True) for t in stats["mean"]]
    loss = bn_match_loss(m, stats["var"], stats["running_mean"], stats["running_var"], weight=weight, eps=eps)
    assert type(loss.grad_fn).__name__ == "CppFunction"  # not a Python torch.library autograd node
    (g,) = torch.autograd.grad(loss, m[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    stats, weight, eps = make([3, 1, 6], torch.float32, device)
    m = [t.clone().requires_grad_(True) for t in stats["mean"]]
    v = [t.clone().requires_grad_(True) for t in stats["var"]]
    for form in range(3):
        torch.library.opcheck(torch.ops.exml_fast.bn_match_loss,
                              (m, v, stats["running_mean"], stats["running_var"], weight, eps, form))


def test_torch_compile_fullgraph():
    stats, weight, eps = make([3, 5], torch.float32, "cpu")
    rm, rv = stats["running_mean"], stats["running_var"]

    def f(m0, m1, v0, v1):
        return bn_match_loss([m0, m1], [v0, v1], rm, rv, weight=weight, eps=eps, form="l2") * 2.0

    leaves = [t.clone().requires_grad_(True) for t in stats["mean"] + stats["var"]]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    leaves2 = [t.detach().clone().requires_grad_(True) for t in leaves]
    want = f(*leaves2)
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, torch.autograd.grad(want, leaves2)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("form", BN_LOSS_FORMS)
@pytest.mark.parametrize("dtype", STAT_DTYPES)
def test_cuda_matches_cpu(device, form, dtype):
    stats, weight, eps = make(CHANNELS[4], dtype, "cpu")
    cuda = {k: [t.to(device) for t in v] for k, v in stats.items()}
    got = grads_of(lambda m, v: bn_match_loss(m, v, cuda["running_mean"], cuda["running_var"], weight=weight,
                                              eps=eps, form=form, return_terms=True), cuda)
    want = grads_of(lambda m, v: bn_match_loss(m, v, stats["running_mean"], stats["running_var"], weight=weight,
                                               eps=eps, form=form, return_terms=True), stats)
    torch.testing.assert_close(got[0].cpu(), want[0], **tol(dtype))
    torch.testing.assert_close(got[1].cpu(), want[1], **tol(dtype))
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a.cpu(), b, **tol(dtype))


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graph_capture(device):
    """The CUDA kernels take their layer table as a launch argument and read the incoming gradient on the
    device: a captured forward + backward replays with new statistics."""
    stats, weight, eps = make([3, 7, 5], torch.float32, device)
    m = [t.clone().requires_grad_(True) for t in stats["mean"]]
    rm, rv = stats["running_mean"], stats["running_var"]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up off the capture
            grads = torch.autograd.grad(bn_match_loss(m, stats["var"], rm, rv, weight=weight, eps=eps), m)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = bn_match_loss(m, stats["var"], rm, rv, weight=weight, eps=eps)
        grads = torch.autograd.grad(loss, m)
    with torch.no_grad():
        for t in m:
            t.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    m2 = [t.detach().clone().requires_grad_(True) for t in m]
    want = reference_bn_match_loss(m2, stats["var"], rm, rv, weight=weight, eps=eps, form="l2")[0]
    torch.testing.assert_close(loss, want.detach())
    for a, b in zip(grads, torch.autograd.grad(want, m2)):
        torch.testing.assert_close(a, b)


def test_errors_name_the_argument():
    stats, weight, eps = make([3, 4], torch.float32, "cpu")
    m, v, rm, rv = stats["mean"], stats["var"], stats["running_mean"], stats["running_var"]
    with pytest.raises(ValueError, match="form must be one of"):
        bn_match_loss(m, v, rm, rv, form="l1")
    with pytest.raises(ValueError, match="at least one layer"):
        bn_match_loss([], [], [], [])
    with pytest.raises(ValueError, match=r"running_var must have one tensor per layer \(2"):
        bn_match_loss(m, v, rm, rv[:1])
    with pytest.raises(ValueError, match=r"weight must have one entry per layer \(2\)"):
        bn_match_loss(m, v, rm, rv, weight=[1.0])
    with pytest.raises(TypeError, match="mean must be a list of tensors"):
        bn_match_loss(m[0], v, rm, rv)
    with pytest.raises(TypeError, match="mean must be float32 or float64"):
        bn_match_loss([t.half() for t in m], v, rm, rv)
    with pytest.raises(RuntimeError, match=r"var\[1\] must have shape \(C,\)"):
        bn_match_loss(m, [v[0], v[1][:2]], rm, rv)
    with pytest.raises(RuntimeError, match=r"var\[0\] must be Float"):
        bn_match_loss(m, [v[0].double(), v[1]], rm, rv)


def test_matcher_loss_is_one_op_and_equals_the_layer_sum():
    """BNStatsMatcher.loss() is bn_match_loss over the forward's statistics; per_layer() still sums to it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 5, 3), torch.nn.BatchNorm2d(5)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    with BNStatsMatcher(net, first_bn_multiplier=10.0, form="sq_std") as m:
        net(x)
        loss = m.loss()
        assert m.loss() is loss  # formed once per forward
        per = m.per_layer()
    assert type(loss.grad_fn).__name__ == "CppFunction"
    torch.testing.assert_close(loss, sum(t for _, t in per), rtol=1e-6, atol=1e-6)
