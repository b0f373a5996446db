"""exml_fast.ops.image_priors against exml_fast.reference.image_priors.

Ground truth: the reference run in float64 on the same input values. In each
dtype the fused op must be at least as accurate as PyTorch's own computation
(the reference on the same input, which computes in float32 for float32, float16
and bfloat16 input), up to a factor of 2 plus a few units of rounding of the
accumulation dtype; each of the four entries is judged against its own scale.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys

import pytest
import torch

from exml_fast import has_ops
from exml_fast.ops.image_priors import image_priors

from _util import DEVICES, DTYPES, acc_dtype, assert_cpp_autograd, eps_of, requires_ops

# the module, not the function exml_fast.reference re-exports under the same name
ref = importlib.import_module("exml_fast.reference.image_priors")

pytestmark = requires_ops

FLAGS = list(itertools.product((3, 7), (False, True), (False, True)))  # k, per_sample, blur_norm
# Half of FLAGS in which each value of each flag appears, and its complement.
HALF_FLAGS = [(3, False, False), (3, True, True), (7, False, True), (7, True, False)]
OTHER_HALF = [f for f in FLAGS if f not in HALF_FLAGS]


def flags_for(dtype: torch.dtype, case: str) -> list[tuple[int, bool, bool]]:
    """Every combination in float32; alternating halves of them in the other dtypes
    (keeps the battery's time in check; each half covers every flag value)."""
    if dtype == torch.float32:
        return FLAGS
    return HALF_FLAGS if (case_ids().index(case) + DTYPES.index(dtype)) % 2 else OTHER_HALF


def sample_inputs(device: str, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Odd sizes, N = 1, H or W = 1, a 1x1 image, constant images, channels_last,
    non-contiguous slices and transposes."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype).to(device)

    return [
        ("nchw", randn(4, 3, 16, 16, scale=2.0, offset=0.5)),
        ("odd_5x7", randn(3, 2, 5, 7)),
        ("odd_37x29", randn(2, 3, 37, 29)),  # two tiles each way on CUDA
        ("batch1", randn(1, 3, 9, 8)),
        ("h1", randn(3, 2, 1, 9)),
        ("w1", randn(3, 2, 9, 1)),
        ("pixel", randn(2, 3, 1, 1)),
        ("constant", torch.full((2, 3, 6, 7), 0.75, dtype=dtype, device=device)),
        ("constant_one_sample", torch.cat([torch.full((1, 2, 5, 5), -1.5),
                                           torch.randn(1, 2, 5, 5, generator=g)]).to(dtype).to(device)),
        ("channels_last", randn(4, 3, 11, 13).to(memory_format=torch.channels_last)),
        ("slice", randn(4, 6, 12, 12)[:, ::2, 1:, :-1]),
        ("transposed", randn(2, 3, 6, 5).transpose(2, 3)),
        ("one_channel", randn(5, 1, 8, 6, scale=0.1, offset=3.0)),
    ]


def case_ids():
    return [name for name, _ in sample_inputs("cpu", torch.float32)]


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def assert_as_accurate_as_torch(ours, torch_own, truth, dtype, extra_slack=0.0, what=""):
    """Per column: max|ours - truth| <= 2 max|torch_own - truth| + 8 eps_acc max|truth| (+ extra)."""
    ours, torch_own, truth = _d(ours), _d(torch_own), _d(truth)
    assert ours.shape == truth.shape, (ours.shape, truth.shape)
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    cols = [(slice(None),)] if ours.dim() != 1 or ours.shape[0] != 4 else [(i,) for i in range(4)]
    if ours.dim() == 2 and ours.shape[1] == 4:
        cols = [(slice(None), i) for i in range(4)]
    for idx in cols:
        err_ours = float((ours[idx] - truth[idx]).abs().max())
        err_torch = float((torch_own[idx] - truth[idx]).abs().max())
        scale = max(float(truth[idx].abs().max()), 1e-30)
        slack = 8 * eps_of(acc_dtype(dtype)) * scale + extra_slack * scale
        assert err_ours <= 2 * err_torch + slack, (
            f"{what} {idx}: error {err_ours:.3e} exceeds 2 x torch's own {err_torch:.3e} + {slack:.3e}"
        )


def _kw(k, per_sample, blur_norm, sigma=None):
    return dict(blur_kernel_size=k, blur_sigma=sigma, per_sample=per_sample,
                blur_per_sample_norm=blur_norm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", case_ids())
def test_forward_matches_reference(device, dtype, case):
    x = dict(sample_inputs(device, dtype))[case]
    for k, ps, bn in flags_for(dtype, case):
        kw = _kw(k, ps, bn)
        out = image_priors(x, **kw)
        assert out.dtype == acc_dtype(dtype) and out.device == x.device
        assert out.shape == ((x.shape[0], 4) if ps else (4,))
        truth = ref.image_priors(_d(x), **kw)
        torch_own = ref.image_priors(x, **kw)
        assert_as_accurate_as_torch(out, torch_own, truth, dtype, what=f"{case} {kw}")


def _grad(fn, x, w, **kw):
    xi = x.detach().clone(memory_format=torch.preserve_format) if x.is_contiguous() or \
        x.is_contiguous(memory_format=torch.channels_last) else x.detach()
    xi.requires_grad_(True)
    out = fn(xi, **kw)
    (gx,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), xi)
    return gx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", case_ids())
def test_backward_matches_reference(device, dtype, case):
    x = dict(sample_inputs(device, dtype))[case]
    g = torch.Generator().manual_seed(7)
    for i, (k, ps, bn) in enumerate(flags_for(dtype, case)):
        kw = _kw(k, ps, bn)
        w = torch.randn((x.shape[0], 4) if ps else (4,), generator=g, dtype=torch.float64)
        if i % 3 == 1:
            w[..., i % 4] = 0  # some entries unused
        dx = _grad(image_priors, x, w.to(device), **kw)
        assert dx.dtype == x.dtype and dx.shape == x.shape and dx.device == x.device
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert dx.is_contiguous(memory_format=torch.channels_last)
        truth = _grad(ref.image_priors, _d(x), w, **kw)
        torch_own = _grad(ref.image_priors, x, w.to(device), **kw)
        # dx is rounded to x's dtype on output: allow one rounding of that dtype.
        assert_as_accurate_as_torch(dx, torch_own, truth, dtype, extra_slack=eps_of(dtype),
                                    what=f"{case} {kw}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [3, 7])
def test_large_224(device, k):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 224, 224, generator=g).to(device)
    for ps, bn in [(False, False), (True, True)]:
        kw = _kw(k, ps, bn, sigma=1.0 if k == 7 else None)
        out = image_priors(x, **kw)
        assert_as_accurate_as_torch(out, ref.image_priors(x, **kw), ref.image_priors(_d(x), **kw),
                                    torch.float32, what=str(kw))
        w = torch.randn(out.shape, generator=g, dtype=torch.float64)
        assert_as_accurate_as_torch(_grad(image_priors, x, w.to(device), **kw),
                                    _grad(ref.image_priors, x, w.to(device), **kw),
                                    _grad(ref.image_priors, _d(x), w, **kw), torch.float32,
                                    extra_slack=eps_of(torch.float32), what=str(kw))


@pytest.mark.parametrize("device", DEVICES)
def test_closed_form(device):
    """A 1x1x2x2 image by hand: D1 = (-1, -1), D2 = (-2, -2), D3 = (3 - 2) = 1, D4 = 1 - 4 = -3."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], device=device, dtype=torch.float64)
    out = image_priors(x, blur_kernel_size=3)
    tv_l1 = 1 + 2 + 1 + 3
    tv_l2 = 2**0.5 + 8**0.5 + 1 + 3
    torch.testing.assert_close(out[:2], torch.tensor([tv_l1, tv_l2], dtype=torch.float64, device=device))
    torch.testing.assert_close(out[3], torch.tensor(30.0, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_sigma_and_kernel(device):
    """Default sigma: torchvision's rule for 3, the ExML reference code's 1.0 for 7; the taps are torchvision's
    kernel."""
    assert ref.default_blur_sigma(3) == pytest.approx(0.8)
    assert ref.default_blur_sigma(7) == 1.0  # was torchvision's 1.4 before the reference code's sigma
    assert ref.torchvision_blur_sigma(3) == pytest.approx(0.8) and ref.torchvision_blur_sigma(7) == pytest.approx(1.4)
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    img = torch.randn(2, 3, 15, 15, dtype=torch.float64)
    for k, sigma in [(3, None), (7, None), (7, 1.0), (3, 2.5)]:
        s = ref.default_blur_sigma(k) if sigma is None else sigma
        # torchvision pads by reflection; compare where no padding is involved.
        tv = tvf.gaussian_blur(img, [k, k], [s, s])
        r = k // 2
        mine = img - (img - torch.nn.functional.conv2d(
            img, ref.gaussian_kernel2d(k, s, dtype=torch.float64).expand(3, 1, k, k),
            padding=r, groups=3))
        torch.testing.assert_close(mine[..., r:-r, r:-r], tv[..., r:-r, r:-r])
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64, device=device)
    a = image_priors(x, blur_kernel_size=7, blur_sigma=1.0)
    b = image_priors(x, blur_kernel_size=7, blur_sigma=1.4)
    assert not torch.allclose(a[2], b[2])  # sigma is honoured
    torch.testing.assert_close(a, ref.image_priors(x, blur_kernel_size=7, blur_sigma=1.0))
    torch.testing.assert_close(image_priors(x, blur_kernel_size=7), a)  # the default is sigma 1.0
    torch.testing.assert_close(ref.image_priors(x, blur_kernel_size=7), a)
    if has_ops():  # the compiled schema's own default (sigma None) stays torchvision's; the wrapper passes 1.0
        torch.testing.assert_close(torch.ops.exml_fast.image_priors(x, 7, None, False, False)[0], b)


@pytest.mark.parametrize("device", DEVICES)
def test_tv_l2_is_the_demo_prior(device):
    x = torch.randn(8, 1, 32, 32, device=device, dtype=torch.float64)
    torch.testing.assert_close(image_priors(x)[1], ref.tv_l2(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,per_sample,blur_norm", FLAGS)
def test_gradcheck_float64(device, k, per_sample, blur_norm):
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, device=device)
    if per_sample:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: image_priors(t, **_kw(k, per_sample, blur_norm)), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    picks = {"nchw": torch.float32, "h1": torch.float64, "channels_last": torch.float16,
             "slice": torch.float32, "constant": torch.float64}
    for i, (name, dtype) in enumerate(picks.items()):
        x = dict(sample_inputs(device, dtype))[name]
        for k, ps, bn in [HALF_FLAGS[i % 4], OTHER_HALF[i % 4]]:
            for requires_grad in (False, True):
                xi = x.detach().clone(memory_format=torch.preserve_format)
                if not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
                    xi = x.detach()  # keep the non-dense strides
                xi.requires_grad_(requires_grad)
                torch.library.opcheck(torch.ops.exml_fast.image_priors.default, (xi, k, None, ps, bn))
            _, sums = torch.ops.exml_fast.image_priors(x, k, None, ps, bn)
            grad = torch.randn((x.shape[0], 4) if ps else (4,), dtype=acc_dtype(dtype), device=device)
            torch.library.opcheck(
                torch.ops.exml_fast._image_priors_backward.default,
                (grad, x.detach(), sums, k, 1.1, ps, bn),
                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
            )


def test_compile_fullgraph():
    torch._dynamo.reset()
    wts = torch.tensor([2.5e-5, 1e-2, 1e-3, 3e-8])

    def step(x):
        return (image_priors(x, blur_kernel_size=3) * wts).sum() + x.square().mean()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(4, 3, 12, 10).to(memory_format=torch.channels_last).requires_grad_(True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    expected = (ref.image_priors(x2, blur_kernel_size=3) * wts).sum() + x2.square().mean()
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-7)


def test_double_backward_refused():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = image_priors(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_is_registered_in_cpp(device):
    """The op's and its backward op's autograd nodes are the C++ ones of csrc/ops/image_priors.cpp: a Python
    autograd node would cost more per call than the kernels."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    out = image_priors(x)
    assert_cpp_autograd(out, "ImagePriorsFunction")
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert_cpp_autograd(g, "ImagePriorsBackwardFunction")
    _, sums = torch.ops.exml_fast.image_priors(x, 3, None, False, False)
    assert sums.grad_fn is None and not sums.requires_grad  # the auxiliary output


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x = torch.randn(16, 3, 40, 33, device=device)
    a = image_priors(x, per_sample=False, blur_per_sample_norm=True)
    b = image_priors(x, per_sample=False, blur_per_sample_norm=True)
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    for name, x in sample_inputs("cpu", dtype):
        for k, ps, bn in FLAGS:
            kw = _kw(k, ps, bn)
            tol = dict(rtol=1e-4, atol=1e-5) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(image_priors(x.cuda(), **kw).cpu(), image_priors(x, **kw),
                                       **tol, msg=f"{name} {kw}")
            w = torch.randn((x.shape[0], 4) if ps else (4,), dtype=acc_dtype(dtype))
            gtol = tol if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=1e-3)
            torch.testing.assert_close(_grad(image_priors, x.cuda(), w.cuda(), **kw).cpu(),
                                       _grad(image_priors, x, w, **kw), **gtol,
                                       msg=f"{name} {kw}")


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,kw,exc,match",
    [
        (torch.randn(3, 4, 5), {}, ValueError, "x must have shape"),
        (torch.ones(2, 3, 4, 4, dtype=torch.int64), {}, TypeError, "x must be float32"),
        (torch.randn(0, 3, 4, 4), {}, ValueError, "must not be empty"),
        (torch.randn(2, 3, 0, 4), {}, ValueError, "must not be empty"),
        (torch.randn(2, 3, 4, 4), {"blur_kernel_size": 5}, ValueError, "blur_kernel_size must be one of"),
        (torch.randn(2, 3, 4, 4), {"blur_kernel_size": True}, ValueError, "blur_kernel_size"),
        (torch.randn(2, 3, 4, 4), {"blur_sigma": 0.0}, ValueError, "blur_sigma must be"),
        (torch.randn(2, 3, 4, 4), {"blur_sigma": float("nan")}, ValueError, "blur_sigma must be"),
        (torch.randn(2, 3, 4, 4), {"blur_sigma": "1"}, TypeError, "blur_sigma must be"),
        ([[1.0]], {}, TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_wrapper(x, kw, exc, match):
    with pytest.raises(exc, match=match):
        image_priors(x, **kw)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(3, 4, 5),), "x must have shape"),
        ((torch.ones(2, 3, 4, 4, dtype=torch.int32),), "x must be float32"),
        ((torch.randn(0, 3, 4, 4),), "must not be empty"),
        ((torch.randn(2, 3, 4, 4), 5), "blur_kernel_size must be 3 or 7"),
        ((torch.randn(2, 3, 4, 4), 3, -1.0), "blur_sigma must be"),
    ],
)
def test_bad_input_kernel(args, match):
    """The compiled op checks its arguments too (for callers of torch.ops directly)."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.exml_fast.image_priors(*args)


def test_bad_backward_args():
    x = torch.randn(2, 3, 5, 5)
    _, sums = torch.ops.exml_fast.image_priors(x)
    bwd = torch.ops.exml_fast._image_priors_backward
    with pytest.raises(RuntimeError, match=r"grad must have shape \(4,\)"):
        bwd(torch.zeros(2, 4), x, sums)
    with pytest.raises(RuntimeError, match=r"grad must have shape \(2, 4\)"):
        bwd(torch.zeros(4), x, sums, 3, None, True, False)
    with pytest.raises(RuntimeError, match="sums must have shape"):
        bwd(torch.zeros(4), x, sums[:1])


def test_fallback_without_compiled_library():
    """EXML_FAST_DISABLE_EXT=1: the wrapper runs the reference, with one warning."""
    code = (
        "import warnings, torch\n"
        "from exml_fast.ops.image_priors import image_priors\n"
        "from exml_fast.reference.image_priors import image_priors as ref\n"
        "x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = image_priors(x, blur_kernel_size=7, per_sample=True)\n"
        "assert any('falling back' in str(m.message) for m in w), w\n"
        "torch.testing.assert_close(out, ref(x, blur_kernel_size=7, per_sample=True))\n"
        "out.sum().backward()\n"
        "assert x.grad is not None\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "EXML_FAST_DISABLE_EXT": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fallback ok" in r.stdout


@pytest.mark.slow
def test_baseline_cpu_loops_pass_the_same_battery():
    """EXML_FAST_CPU_ISA=base forces the baseline x86-64 build of the CPU loops."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "matches_reference and cpu"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "EXML_FAST_CPU_ISA": "base"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
