"""exml_fast.ops.augment / augment_with_params against exml_fast.reference.augment.

The op is a pure gather (every output element is one input element or 0), so
values and gradients are compared bit-exactly, in every dtype, against two
independent references: the vectorised gather (reference.augment_with_params)
and the per-sample torch.roll / torch.flip / F.pad loop a user would write.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _util import DEVICES, DTYPES, assert_cpp_autograd, requires_ops

from exml_fast.ops.augment import augment, augment_with_params, draw_augment_params
from exml_fast.reference.augment import augment as ref_augment
from exml_fast.reference.augment import augment_with_params as ref_apply
from exml_fast.reference.augment import augment_with_params_loop as ref_loop

pytestmark = requires_ops

CL = torch.channels_last
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (compares NaN payloads and -0.0 too)."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def sample_inputs(device: str, dtype: torch.dtype):
    """(name, x, max_shift, pad_crop): odd sizes, N = 1, empty, shifts >= H,
    pad > H, 1x1 images, channels_last, non-contiguous."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, fmt=torch.contiguous_format):
        return torch.randn(*shape, generator=g).to(dtype).to(device).contiguous(memory_format=fmt)

    return [
        ("nchw", randn(4, 3, 8, 8), 2, 4),
        ("channels_last", randn(4, 3, 8, 8, fmt=CL), 2, 4),
        ("odd", randn(5, 3, 7, 9), 3, 2),
        ("odd_channels_last", randn(5, 3, 7, 9, fmt=CL), 3, 2),
        ("batch1", randn(1, 2, 5, 6), 1, 1),
        ("shift_ge_size", randn(3, 2, 4, 5), 9, 0),
        ("pad_gt_size", randn(3, 2, 5, 4), 1, 7),
        ("one_pixel", randn(2, 3, 1, 1), 2, 1),
        ("one_channel_cl", randn(3, 1, 6, 6, fmt=CL), 2, 1),
        ("many_channels_cl", randn(2, 17, 5, 6, fmt=CL), 2, 3),
        ("rgba_channels_last", randn(3, 4, 6, 7, fmt=CL), 2, 2),
        ("slice_batch", randn(6, 3, 5, 7)[::2], 2, 2),
        ("transposed", randn(3, 2, 6, 5).transpose(2, 3), 2, 1),
        ("wide", randn(2, 3, 4, 67), 30, 0),
        ("empty_batch", randn(0, 3, 4, 4), 2, 2),
        ("empty_spatial", randn(2, 3, 0, 5), 2, 2),
    ]


def case_ids():
    return [c[0] for c in sample_inputs("cpu", torch.float32)]


def case(device, dtype, name):
    for c in sample_inputs(device, dtype):
        if c[0] == name:
            x, max_shift, pad = c[1:]
            params = draw_augment_params(x.shape[0], max_shift=max_shift, pad_crop=pad,
                                         generator=torch.Generator().manual_seed(99)).to(device)
            return x, params, pad
    raise KeyError(name)


def expected_format(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=CL):
        return CL
    return torch.contiguous_format


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", case_ids())
def test_forward_matches_reference(device, dtype, name):
    x, params, pad = case(device, dtype, name)
    out = augment_with_params(x, params, pad_crop=pad)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=expected_format(x))
    assert torch.equal(bits(out), bits(ref_apply(x, params, pad_crop=pad)))
    assert torch.equal(bits(out), bits(ref_loop(x, params, pad_crop=pad)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", case_ids())
def test_backward_matches_reference(device, dtype, name):
    x, params, pad = case(device, dtype, name)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)

    def grad_of(fn):
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(xi, params, pad_crop=pad), xi, grad)
        return gx

    gx = grad_of(augment_with_params)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert torch.equal(gx, grad_of(ref_apply))
    assert torch.equal(gx, grad_of(ref_loop))


@pytest.mark.parametrize("device", DEVICES)
def test_bit_exact_nan_inf_signed_zero(device):
    x = torch.randn(3, 2, 6, 7, dtype=torch.float32)
    x[0, 0, 1, 2] = float("nan")
    x[1, 1, 3, 3] = -float("inf")
    x[2, 0, 0, 0] = -0.0
    x = x.to(device)
    params = draw_augment_params(3, max_shift=3, pad_crop=2,
                                 generator=torch.Generator().manual_seed(1)).to(device)
    out = augment_with_params(x, params, pad_crop=2)
    assert torch.equal(bits(out), bits(ref_loop(x, params, pad_crop=2)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last", "strided", "expanded"])
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_backward_accepts_any_grad_layout(device, grad_layout, x_layout):
    x = torch.randn(4, 3, 6, 5, dtype=torch.float64, device=device)
    if x_layout == "channels_last":
        x = x.to(memory_format=CL)
    params = draw_augment_params(4, max_shift=2, pad_crop=2,
                                 generator=torch.Generator().manual_seed(3)).to(device)
    g = torch.randn(4, 3, 6, 5, dtype=torch.float64, device=device)
    if grad_layout == "channels_last":
        g = g.to(memory_format=CL)
    elif grad_layout == "strided":
        g = torch.randn(4, 3, 12, 5, dtype=torch.float64, device=device)[:, :, ::2]
    elif grad_layout == "expanded":
        g = torch.randn(1, 3, 6, 1, dtype=torch.float64, device=device).expand(4, 3, 6, 5)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ref_apply(xr, params, pad_crop=2), xr, g)
    got = torch.ops.exml_fast._augment_with_params_backward(g, params, 2)
    assert torch.equal(got, want)
    xo = x.clone().requires_grad_(True)
    (got2,) = torch.autograd.grad(augment_with_params(xo, params, pad_crop=2), xo, g)
    assert torch.equal(got2, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,pad,cl", [((3, 2, 5, 4), 2, False), ((2, 3, 4, 6), 1, True),
                                          ((1, 1, 3, 7), 5, False)])
def test_gradcheck_and_gradgradcheck(device, shape, pad, cl):
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    if cl:
        x = x.to(memory_format=CL)
    x.requires_grad_(True)
    params = draw_augment_params(shape[0], max_shift=3, pad_crop=pad,
                                 generator=torch.Generator().manual_seed(11)).to(device)
    fn = lambda t: augment_with_params(t, params, pad_crop=pad)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_is_registered_in_cpp(device):
    """Both ops' autograd nodes are the C++ ones of csrc/ops/augment.cpp (a Python autograd node would cost
    more per call than the gather), each the other's derivative: the third derivative is the gather again."""
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    params = draw_augment_params(2, max_shift=2, pad_crop=1, generator=torch.Generator().manual_seed(3)).to(device)
    y = augment_with_params(x, params, pad_crop=1)
    assert_cpp_autograd(y, "AugmentFunction<false>")
    g = torch.randn_like(y).requires_grad_(True)
    (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
    assert_cpp_autograd(dx, "AugmentFunction<true>")
    v = torch.randn_like(dx)
    (dg,) = torch.autograd.grad(dx, g, v)
    torch.testing.assert_close(dg, torch.ops.exml_fast.augment_with_params(v, params, 1), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_adjoint(device):
    """<A x, g> == <x, A^T g> exactly enough in fp64, and A^T A is the 0/1 mask."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(6, 3, 9, 11, dtype=torch.float64, generator=gen).to(device)
    g = torch.randn(6, 3, 9, 11, dtype=torch.float64, generator=gen).to(device)
    params = draw_augment_params(6, max_shift=5, pad_crop=3, generator=gen).to(device)
    ax = torch.ops.exml_fast.augment_with_params(x, params, 3)
    atg = torch.ops.exml_fast._augment_with_params_backward(g, params, 3)
    torch.testing.assert_close((ax * g).sum(), (x * atg).sum(), rtol=1e-12, atol=1e-12)
    # Each input is read at most once: A^T (A 1) is 0/1 and counts the read pixels.
    ones = torch.ones_like(x)
    mask = torch.ops.exml_fast._augment_with_params_backward(
        torch.ops.exml_fast.augment_with_params(ones, params, 3), params, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum() == torch.ops.exml_fast.augment_with_params(ones, params, 3).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck(device, dtype):
    for name, x, max_shift, pad in sample_inputs(device, dtype):
        if name in ("wide", "many_channels_cl"):
            continue
        params = draw_augment_params(x.shape[0], max_shift=max_shift, pad_crop=pad,
                                     generator=torch.Generator().manual_seed(2)).to(device)
        for requires_grad in (False, True):
            xi = x.detach().clone(memory_format=torch.preserve_format)
            if not x.is_contiguous() and not x.is_contiguous(memory_format=CL):
                xi = x.detach()  # keep the non-dense strides
            xi.requires_grad_(requires_grad and x.numel() > 0)
            torch.library.opcheck(torch.ops.exml_fast.augment_with_params.default, (xi, params, pad))
        torch.library.opcheck(torch.ops.exml_fast._augment_with_params_backward.default,
                              (x.detach(), params.to(torch.int32), pad))


def test_compile_fullgraph():
    torch._dynamo.reset()
    params = draw_augment_params(4, max_shift=2, pad_crop=2, generator=torch.Generator().manual_seed(4))

    def step(x):
        return (augment_with_params(x, params, pad_crop=2).square() * 0.5).sum()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(4, 3, 8, 8).to(memory_format=CL).requires_grad_(True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    expected = (ref_apply(x2, params, pad_crop=2).square() * 0.5).sum()
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x.grad, x2.grad)

    # The random draw traces too (torch's default generator; no generator object).
    def drawn(x):
        return augment(x, max_shift=2, pad_crop=1, return_params=True)

    y, p = torch.compile(drawn, fullgraph=True)(x.detach())
    assert torch.equal(y, ref_apply(x.detach(), p, pad_crop=1))


# -- the random draw ---------------------------------------------------------------


def test_param_distribution():
    n, max_shift, pad = 20000, 3, 2
    params = draw_augment_params(n, max_shift=max_shift, pad_crop=pad,
                                 generator=torch.Generator().manual_seed(0))
    assert params.shape == (n, 5) and params.dtype == torch.int64
    for col, (lo, hi) in enumerate([(-3, 3), (-3, 3), (0, 1), (0, 4), (0, 4)]):
        values = params[:, col]
        assert int(values.min()) == lo and int(values.max()) == hi  # in range, ends reached
        counts = torch.bincount(values - lo, minlength=hi - lo + 1)
        assert (counts > 0).all()  # every value reachable
        expect = n / (hi - lo + 1)  # uniform: each count within 6 sigma
        assert ((counts - expect).abs() < 6 * expect**0.5).all(), counts
    assert abs(params[:, 2].double().mean().item() - 0.5) < 0.02
    # Columns are independent draws: (dy, dx) pairs cover all 49 combinations.
    assert torch.unique(params[:, 0] * 7 + params[:, 1]).numel() == 49
    off = draw_augment_params(100, max_shift=0, flip=False, pad_crop=0)
    assert torch.equal(off, torch.zeros(100, 5, dtype=torch.int64))


def test_per_sample_independence():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).expand(64, 3, 8, 8).contiguous()
    out, params = augment(x, max_shift=3, pad_crop=2, generator=torch.Generator().manual_seed(8),
                          return_params=True)
    assert torch.unique(params, dim=0).shape[0] > 40  # 64 draws of 7*7*2*5*5 combinations
    distinct = torch.unique(out[:, 0].reshape(64, -1), dim=0).shape[0]
    assert distinct == torch.unique(params, dim=0).shape[0]
    # Channels of one sample share the draw.
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_generator_determinism_and_reuse():
    x = torch.randn(16, 3, 10, 10)
    a, pa = augment(x, max_shift=2, pad_crop=3, generator=torch.Generator().manual_seed(5),
                    return_params=True)
    b, pb = augment(x, max_shift=2, pad_crop=3, generator=torch.Generator().manual_seed(5),
                    return_params=True)
    c = augment(x, max_shift=2, pad_crop=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(pa, pb) and torch.equal(a, b) and not torch.equal(a, c)
    # The same draw applied again (e.g. to a student's input or a mask).
    assert torch.equal(augment_with_params(x, pa, pad_crop=3), a)
    assert torch.equal(a, ref_augment(x, max_shift=2, pad_crop=3,
                                      generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(3)
    d = augment(x, max_shift=2)
    torch.manual_seed(3)
    assert torch.equal(d, augment(x, max_shift=2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity(device, dtype):
    x = torch.randn(5, 3, 7, 6).to(dtype).to(device)
    out = augment(x, max_shift=0, flip=False, pad_crop=0)
    assert torch.equal(out, x)
    xc = x.to(memory_format=CL)
    out = augment(xc, max_shift=0, flip=False, pad_crop=0)
    assert torch.equal(out, x) and out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("device", DEVICES)
def test_roll_edges_and_big_pad(device):
    x = torch.randn(2, 2, 5, 7, dtype=torch.float64, device=device)
    h, w = 5, 7
    for dy, dx in [(h, w), (-h, -w), (2 * h + 1, -3 * w - 2), (-1, 1), (h - 1, 1 - w)]:
        params = torch.tensor([[dy, dx, 0, 0, 0], [dy, dx, 1, 0, 0]], device=device)
        out = augment_with_params(x, params)
        want0 = torch.roll(x[0], shifts=(dy, dx), dims=(-2, -1))
        assert torch.equal(out[0], want0)
        assert torch.equal(out[1], torch.flip(torch.roll(x[1], (dy, dx), (-2, -1)), (-1,)))
    # pad_crop > H and W: crops anywhere from all zeros to the full image.
    p = 9
    params = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, p, p]], device=device)
    out = augment_with_params(x, params, pad_crop=p)
    assert torch.equal(out[0], torch.zeros_like(x[0])) and torch.equal(out[1], x[1])
    params = torch.tensor([[1, -2, 1, 2 * p, 3], [0, 0, 0, p + 2, p - 3]], device=device)
    out = augment_with_params(x, params, pad_crop=p)
    assert torch.equal(out, ref_loop(x, params, pad_crop=p))
    assert out[1, :, 3:].abs().sum() == 0 and out[1, :, :, :3].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_random_shapes_against_loop(device):
    gen = torch.Generator().manual_seed(77)
    for trial in range(60):
        n, c, h, w = (int(v) for v in torch.randint(1, 9, (4,), generator=gen))
        p = int(torch.randint(0, 10, (), generator=gen))
        x = torch.randn(n, c, h, w, generator=gen).to(device)
        if trial % 2:
            x = x.to(memory_format=CL)
        params = torch.cat([torch.randint(-20, 21, (n, 2), generator=gen),
                            torch.randint(0, 2, (n, 1), generator=gen),
                            torch.randint(0, 2 * p + 1, (n, 2), generator=gen)], 1).to(device)
        out = augment_with_params(x, params, pad_crop=p)
        assert torch.equal(out, ref_loop(x, params, pad_crop=p)), (trial, params)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_params(device):
    x = torch.randn(3, 2, 6, 6, device=device)
    params = draw_augment_params(3, max_shift=2, pad_crop=1, generator=torch.Generator().manual_seed(0))
    params = params.to(device)
    assert torch.equal(augment_with_params(x, params.int(), pad_crop=1),
                       augment_with_params(x, params, pad_crop=1))


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"x": torch.randn(3, 4, 4)}, ValueError, "x must have shape"),
        ({"x": torch.ones(2, 3, 4, 4, dtype=torch.int64)}, TypeError, "x must be float32"),
        ({"max_shift": -1}, ValueError, "max_shift must be an int in"),
        ({"max_shift": 1.5}, TypeError, "max_shift must be an int"),
        ({"max_shift": True}, TypeError, "max_shift must be an int"),
        ({"pad_crop": -2}, ValueError, "pad_crop must be an int in"),
        ({"flip": 1}, TypeError, "flip must be a bool"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_input_augment(kwargs, exc, match):
    args = {"x": torch.randn(2, 3, 4, 4), "max_shift": 2, **kwargs}
    x = args.pop("x")
    with pytest.raises(exc, match=match):
        augment(x, **args)


def test_bad_params():
    x = torch.randn(2, 3, 4, 4)
    good = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="params must be a torch.Tensor"):
        augment_with_params(x, [[0] * 5] * 2)
    with pytest.raises(ValueError, match=r"params must have shape \(N, 5\) = \(2, 5\)"):
        augment_with_params(x, torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"params must have shape"):
        augment_with_params(x, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="params must be an integer tensor"):
        augment_with_params(x, good.float())
    with pytest.raises(TypeError, match="params must be an integer tensor"):
        augment_with_params(x, good.bool())
    bad_flip = good.clone()
    bad_flip[1, 2] = 2
    with pytest.raises(ValueError, match=r"params\[:, 2\] \(flip\) must be 0 or 1"):
        augment_with_params(x, bad_flip)
    bad_crop = good.clone()
    bad_crop[0, 3] = 3
    with pytest.raises(ValueError, match=r"\(oy, ox\) must lie in \[0, 2 \* pad_crop\] = \[0, 2\]"):
        augment_with_params(x, bad_crop, pad_crop=1)
    bad_crop[0, 3] = -1
    with pytest.raises(ValueError, match=r"\(oy, ox\) must lie in"):
        augment_with_params(x, bad_crop, pad_crop=1)
    with pytest.raises(ValueError, match="pad_crop must be an int in"):
        augment_with_params(x, good, pad_crop=-1)
    # check_values=False skips the value checks only (a valid draw then reads nothing back to the host) ...
    assert torch.equal(augment_with_params(x, good, check_values=False), augment_with_params(x, good))
    with pytest.raises(ValueError, match=r"params must have shape"):  # ... never the shape checks
        augment_with_params(x, torch.zeros(3, 5, dtype=torch.int64), check_values=False)


@pytest.mark.parametrize(
    "x,params,pad,match",
    [
        (torch.randn(3, 4, 4), torch.zeros(3, 5, dtype=torch.int64), 0, "x must have shape"),
        (torch.ones(2, 3, 4, 4, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int64), 0,
         "x must be float32"),
        (torch.randn(2, 3, 4, 4), torch.zeros(2, 4, dtype=torch.int64), 0, "params must have shape"),
        (torch.randn(2, 3, 4, 4), torch.zeros(2, 5), 0, "params must be an integer tensor"),
        (torch.randn(2, 3, 4, 4), torch.zeros(2, 5, dtype=torch.int64), -1, "pad must be in"),
    ],
)
def test_bad_input_kernel(x, params, pad, match):
    """The compiled ops check their arguments too (for callers of torch.ops directly)."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.exml_fast.augment_with_params(x, params, pad)
    with pytest.raises(RuntimeError, match=match.replace("x must", "grad_out must")):
        torch.ops.exml_fast._augment_with_params_backward(x, params, pad)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_accepts_any_param_values(device):
    """Unchecked values (CUDA does not check them) stay well defined: nonzero flip
    flips; crop offsets out of range read padding, as the reference computes."""
    x = torch.randn(3, 2, 5, 6, device=device)
    params = torch.tensor([[1, 2, 5, -7, 3], [-4, 9, 0, 100, -100], [2**40, -(2**40), 1, 1, 1]],
                          device=device)
    out = torch.ops.exml_fast.augment_with_params(x, params, 1)
    assert torch.equal(out, ref_apply(x, params, pad_crop=1))
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ref_apply(xr, params, pad_crop=1), xr, g)
    assert torch.equal(torch.ops.exml_fast._augment_with_params_backward(g, params, 1), want)


@pytest.mark.parametrize("device", [DEVICES[1]])
def test_cuda_matches_cpu_and_generator_device(device):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 3, 32, 32, device="cuda", requires_grad=True)
    augment(x, max_shift=2, pad_crop=4, generator=gen)  # warm-up (lazy initialisation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the draw, forward and backward never sync the host
    try:
        out, params = augment(x, max_shift=2, pad_crop=4, generator=gen, return_params=True)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    x = x.detach()
    assert torch.equal(gx.cpu(), torch.ops.exml_fast._augment_with_params_backward(
        torch.ones(64, 3, 32, 32), params.cpu(), 4))
    assert params.device == x.device
    assert torch.equal(out.cpu(), augment_with_params(x.cpu(), params.cpu(), pad_crop=4))
    xl = x.to(memory_format=CL)
    out_cl = augment_with_params(xl, params, pad_crop=4)
    assert out_cl.is_contiguous(memory_format=CL) and torch.equal(out_cl, out)
    with pytest.raises(ValueError, match="generator is on cpu but x is on cuda"):
        augment(x, max_shift=2, generator=torch.Generator())
    with pytest.raises(ValueError, match="generator is on cuda"):
        augment(x.cpu(), max_shift=2, generator=gen)
    with pytest.raises(ValueError, match="params is on cpu but x is on cuda"):
        augment_with_params(x, params.cpu(), pad_crop=4)


def test_fallback_without_extension():
    """With EXML_FAST_DISABLE_EXT=1 the wrappers run the reference, with the same results."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import exml_fast\n"
        "from exml_fast.ops.augment import augment, augment_with_params\n"
        "from exml_fast.reference.augment import augment_with_params_loop as ref_loop\n"
        "assert not exml_fast.has_ops()\n"
        "x = torch.randn(4, 3, 8, 8, requires_grad=True)\n"
        "y, p = augment(x, max_shift=2, pad_crop=2, generator=torch.Generator().manual_seed(1),"
        " return_params=True)\n"
        "assert torch.equal(y, ref_loop(x.detach(), p, pad_crop=2))\n"
        "y.sum().backward()\n"
        "assert torch.equal(augment_with_params(x, p, pad_crop=2), y)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "EXML_FAST_DISABLE_EXT": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok"
