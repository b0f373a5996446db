"""exml_fast.ops.upsample_conv (nearest 2× upsampling + 3×3 convolution as four 2×2 ones) against the
reference ``conv2d(interpolate(x))``, and SKDGenerator's use of it.

Tolerances. With inputs, weights and output gradients drawn from {-1, 0, 1}, every product and partial sum
of both computations is an integer of magnitude at most the number of terms (under 256 in every case here),
which float32, float64, float16 and bfloat16 all hold exactly, whatever the summation order: values and
gradients must then be *equal*, so any misplaced tap, phase or border shows. On random real inputs the two
differ only in summation order and in the one extra rounding of a tap sum (w1 + w2), so each is compared with
the float64 result within the worst-case dot-product bound (n + 2) eps Σ|w||x| (n = 9 C terms).
"""

from __future__ import annotations

import pytest
import torch
from _util import DEVICES, DTYPES, eps_of
from torch import nn

from exml_fast.models.generators import SKDGenerator, build_generator
from exml_fast.ops.upsample_conv import fusable_upsample_conv, upsample2x_conv3x3
from exml_fast.reference.upsample_conv import upsample2x_conv3x3 as reference

CL = torch.channels_last


def ternary(*shape, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_the_reference_exactly_on_integer_data(device, dtype, layout, with_bias):
    n, c, h, w, o = 2, 3, 4, 5, 4
    x = ternary(n, c, h, w + 3, seed=1, dtype=dtype, device=device)
    x = x[..., 1:w + 1] if layout == "strided" else x[..., :w].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    weight = ternary(o, c, 3, 3, seed=2, dtype=dtype, device=device)
    bias = ternary(o, seed=3, dtype=dtype, device=device) if with_bias else None
    grad = ternary(n, o, 2 * h, 2 * w, seed=4, dtype=dtype, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight) + ((bias,) if with_bias else ())]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, weight) + ((bias,) if with_bias else ())]
    out = upsample2x_conv3x3(*leaves)
    expected = reference(*ref_leaves)
    assert out.shape == (n, o, 2 * h, 2 * w) and out.dtype == dtype and out.device == x.device
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(leaves, ref_leaves):
        assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 8, 4, 4, 6), (1, 16, 8, 3, 5), (3, 1, 1, 1, 2)])
def test_random_inputs_within_the_dot_product_bound(device, dtype, shape):
    n, c, h, w, o = shape
    g = torch.Generator().manual_seed(5)
    x64, w64, b64 = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64),
                     torch.randn(o, c, 3, 3, generator=g, dtype=torch.float64),
                     torch.randn(o, generator=g, dtype=torch.float64))
    truth = reference(x64, w64, b64)
    magnitude = reference(x64.abs(), w64.abs(), b64.abs())
    x, weight, bias = (t.to(dtype).to(device) for t in (x64, w64, b64))
    got = upsample2x_conv3x3(x, weight, bias).double().cpu()
    # per unit of magnitude: n = 9 C sums, the tap sum's rounding, x's and weight's rounding to dtype, and
    # the output's: (n + 4) eps, one more for the bias term
    bound = (9 * c + 5) * eps_of(dtype) * magnitude
    assert ((got - truth).abs() <= bound).all()


def test_gradcheck_and_double_backward_in_float64():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample2x_conv3x3, (x, weight, bias))
    assert torch.autograd.gradgradcheck(upsample2x_conv3x3, (x, weight, bias))


def test_empty_batch():
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, requires_grad=True)
    out = upsample2x_conv3x3(x, weight)
    assert out.shape == (0, 2, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(weight.grad, torch.zeros_like(weight))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = ternary(2, 3, 4, 4, seed=7).requires_grad_(True)
    weight = ternary(5, 3, 3, 3, seed=8).requires_grad_(True)
    out = torch.compile(lambda a, b: upsample2x_conv3x3(a, b).square().sum(), fullgraph=True)(x, weight)
    out.backward()
    x2, w2 = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    expected = reference(x2, w2).square().sum()
    expected.backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, x2.grad) and torch.equal(weight.grad, w2.grad)


def _count_einsums(monkeypatch) -> list:
    """Calls of torch.einsum from now on: the combination of the 3×3 kernel into the four 2×2 ones."""
    calls, einsum = [], torch.einsum

    def counted(*args, **kwargs):
        calls.append(1)
        return einsum(*args, **kwargs)
    monkeypatch.setattr(torch, "einsum", counted)
    return calls


def test_a_frozen_weight_is_combined_once_until_it_changes(monkeypatch):
    x = ternary(2, 3, 4, 5, seed=11)
    weight = ternary(4, 3, 3, 3, seed=12)
    bias = ternary(4, seed=13)
    calls = _count_einsums(monkeypatch)
    first = upsample2x_conv3x3(x, weight, bias)
    again = upsample2x_conv3x3(x, weight, bias)
    assert len(calls) == 1 and torch.equal(first, again) and torch.equal(first, reference(x, weight, bias))
    with torch.no_grad():
        weight.mul_(-1)  # in place: the version moves
    changed = upsample2x_conv3x3(x, weight, bias)
    assert len(calls) == 2 and torch.equal(changed, reference(x, weight, bias))
    weight.data = ternary(4, 3, 3, 3, seed=14)  # new data, same tensor object
    assert torch.equal(upsample2x_conv3x3(x, weight, bias), reference(x, weight, bias)) and len(calls) == 3
    other = weight.clone()  # another tensor (same values): its own entry
    assert torch.equal(upsample2x_conv3x3(x, other, bias), reference(x, weight, bias)) and len(calls) == 4
    # A frozen weight still passes gradients to x.
    xg = x.clone().requires_grad_(True)
    upsample2x_conv3x3(xg, weight, bias).square().sum().backward()
    xr = x.clone().requires_grad_(True)
    reference(xr, weight, bias).square().sum().backward()
    assert len(calls) == 4 and torch.equal(xg.grad, xr.grad)


def test_a_weight_that_needs_a_gradient_is_combined_in_the_graph(monkeypatch):
    x = ternary(2, 3, 4, 5, seed=15)
    weight = ternary(4, 3, 3, 3, seed=16)
    grad = ternary(2, 4, 8, 10, seed=17)
    calls = _count_einsums(monkeypatch)
    upsample2x_conv3x3(x, weight)  # frozen: cached ...
    weight.requires_grad_(True)  # ... but a weight that needs a gradient bypasses the cache
    for _ in range(2):
        weight.grad = None
        upsample2x_conv3x3(x, weight).backward(grad)
        w2 = weight.detach().clone().requires_grad_(True)
        reference(x, w2).backward(grad)
        assert torch.equal(weight.grad, w2.grad)
    assert len(calls) == 3
    with torch.no_grad():  # no graph to keep: the first call's entry serves (the weight did not change)
        assert torch.equal(upsample2x_conv3x3(x, weight), reference(x, weight))
    assert len(calls) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture_reads_the_weight_at_replay():
    """Under CUDA graph capture the taps and the combined kernels are built in the graph (no copy from host
    memory, no cached tensor): a frozen weight updated in place between replays is seen."""
    x = ternary(2, 3, 4, 5, seed=18, device="cuda")
    weight = ternary(4, 3, 3, 3, seed=19, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        upsample2x_conv3x3(x, weight)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = upsample2x_conv3x3(x, weight)
    graph.replay()
    assert torch.equal(out, reference(x, weight))
    with torch.no_grad():
        weight.mul_(-1)
    graph.replay()
    assert torch.equal(out, reference(x, weight))


@pytest.mark.parametrize(("args", "error", "match"), [
    (("x", torch.randn(3, 3, 3)), ValueError, r"x must have shape \(N, C, H, W\)"),
    (("x", torch.randn(1, 3, 4, 4).long()), TypeError, "x must be float32"),
    (("weight", [1.0]), TypeError, "weight must be a torch.Tensor"),
    (("weight", torch.randn(2, 3, 5, 5)), ValueError, r"weight must have shape \(C_out, 3, 3, 3\)"),
    (("weight", torch.randn(2, 4, 3, 3)), ValueError, r"weight must have shape \(C_out, 3, 3, 3\)"),
    (("weight", torch.randn(2, 3, 3, 3, dtype=torch.float64)), ValueError, "weight must have x's dtype"),
    (("bias", torch.randn(3)), ValueError, r"bias must be None or have shape \(2,\)"),
])
def test_bad_input_names_the_argument(args, error, match):
    kwargs = {"x": torch.randn(1, 3, 4, 4), "weight": torch.randn(2, 3, 3, 3), "bias": None}
    kwargs[args[0]] = args[1]
    with pytest.raises(error, match=match):
        upsample2x_conv3x3(**kwargs)


def test_which_pairs_are_fusable():
    up, conv = nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1)
    assert fusable_upsample_conv(up, conv)
    assert fusable_upsample_conv(nn.Upsample(scale_factor=(2, 2)), conv)
    assert not fusable_upsample_conv(conv, up)
    assert not fusable_upsample_conv(nn.Upsample(scale_factor=2, mode="bilinear"), conv)
    assert not fusable_upsample_conv(nn.Upsample(scale_factor=3), conv)
    assert not fusable_upsample_conv(nn.Upsample(size=8), conv)
    for other in (nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1, stride=2),
                  nn.Conv2d(4, 4, 5, padding=2), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                  nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3)):
        assert not fusable_upsample_conv(up, other)


@pytest.mark.parametrize("arch", ["skd-small", "skd-narrow"])
@pytest.mark.parametrize("train", [True, False])
def test_the_generator_computes_what_its_layers_one_by_one_do(arch, train):
    torch.manual_seed(0)
    gen = build_generator(arch, (1, 16, 16)).train(train)
    assert sum(fusable_upsample_conv(a, b) for a, b in zip(gen.body, list(gen.body)[1:])) == 2
    z = torch.randn(6, gen.latent_dim)
    unfused = build_generator(arch, (1, 16, 16)).train(train)
    unfused.load_state_dict(gen.state_dict())
    unfused.fuse_upsample_conv = False
    out, ref_out = gen(z), unfused(z)
    # BN's batch statistics renormalise the convolutions' float32 rounding: compared at a few float32 ulps
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    for (name, p), q in zip(gen.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    if train:  # the BN running statistics the fused forward left equal the unfused ones'
        for (name, b), c in zip(gen.named_buffers(), unfused.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    assert SKDGenerator.fuse_upsample_conv is None and list(gen.state_dict()) == list(unfused.state_dict())


@pytest.mark.parametrize("flag,device,fused", [(None, "cpu", True), (None, "meta", False), (True, "meta", True),
                                               (False, "cpu", False)])
def test_the_generator_fuses_on_cpu_tensors_unless_told(monkeypatch, flag, device, fused):
    # None (the default): fused on CPU tensors only (on an H100 the composite was slower than F.interpolate +
    # cuDNN, see generators.py); True / False on an instance: on every device, or nowhere. "meta" stands in for
    # a GPU: the decision is made on the tensor's device type.
    import exml_fast.models.generators as generators
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return upsample2x_conv3x3(*a, **k)
    monkeypatch.setattr(generators, "upsample2x_conv3x3", counted)
    gen = build_generator("skd-narrow", (1, 16, 16)).to(device)
    if flag is not None:
        gen.fuse_upsample_conv = flag
    out = gen(torch.randn(4, gen.latent_dim, device=device))
    assert out.shape == (4, 1, 16, 16) and len(calls) == (2 if fused else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_is_16bit", [True, False])
def test_under_autocast_it_follows_conv2ds_policy(device, dtype, with_bias, x_is_16bit):
    # x, weight and bias meet as conv2d's do under autocast: cast to the autocast dtype. x in 16 bits is what
    # the layer before gives under autocast; with the float32 weight it raised "weight must have x's dtype"
    # before. Integer data: exact.
    n, c, h, w, o = 2, 3, 4, 5, 4
    x_dtype = dtype if x_is_16bit else torch.float32
    tensors = [ternary(n, c, h, w, seed=1, dtype=x_dtype, device=device),
               ternary(o, c, 3, 3, seed=2, device=device)]
    if with_bias:
        tensors.append(ternary(o, seed=3, device=device))
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    ref_leaves = [t.clone().requires_grad_(True) for t in tensors]
    grad = ternary(n, o, 2 * h, 2 * w, seed=4, dtype=dtype, device=device)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        out = upsample2x_conv3x3(*leaves)
        expected = reference(*ref_leaves)
    assert out.dtype == expected.dtype == dtype and out.shape == (n, o, 2 * h, 2 * w)
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == got.dtype and torch.equal(got.grad, want.grad)


def test_under_autocast_float64_inputs_stay_float64():
    # as conv2d under autocast: float64 is not cast down
    x, weight = ternary(2, 3, 4, 4, seed=1, dtype=torch.float64), ternary(2, 3, 3, 3, seed=2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample2x_conv3x3(x, weight)
    assert out.dtype == torch.float64 and torch.equal(out, reference(x, weight))


def test_under_autocast_a_frozen_weight_gives_the_cast_weights_result():
    # the phase-kernel cache is keyed on the weight it combines: under autocast that is the 16-bit copy, and
    # the float32 weight's own cached kernels are neither used nor replaced
    weight = ternary(5, 3, 3, 3, seed=2)
    x = ternary(2, 3, 4, 4, seed=1)
    before = upsample2x_conv3x3(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            out = upsample2x_conv3x3(x, weight)
            assert out.dtype == torch.bfloat16 and torch.equal(out, reference(x, weight))
    assert torch.equal(upsample2x_conv3x3(x, weight), before) and before.dtype == torch.float32


@pytest.mark.parametrize("arch", ["dafl", "skd-narrow"])
def test_a_fused_generator_trains_under_cpu_autocast(arch):
    # DAFL's generator under torch.autocast("cpu", bfloat16): the fused layers take the 16-bit activations
    # with their float32 weights; the result is the unfused generator's up to bfloat16 rounding, and every
    # parameter gets a float32 gradient
    torch.manual_seed(0)
    gen = build_generator(arch, (1, 16, 16)).train()
    unfused = build_generator(arch, (1, 16, 16)).train()
    unfused.load_state_dict(gen.state_dict())
    unfused.fuse_upsample_conv = False
    z = torch.randn(8, gen.latent_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref_out = gen(z), unfused(z)
    assert out.dtype == ref_out.dtype
    # bfloat16 keeps 8 significant bits; the outputs are BN-normalised (unit scale)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=0.1)
    out.float().square().mean().backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_compile_fullgraph_under_autocast():
    torch._dynamo.reset()
    x = ternary(2, 3, 4, 4, seed=7).requires_grad_(True)
    weight = ternary(5, 3, 3, 3, seed=8).requires_grad_(True)

    def f(a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return upsample2x_conv3x3(a.bfloat16(), b)
    out = torch.compile(f, fullgraph=True)(x, weight)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference(x, weight).bfloat16())
    out.float().square().sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()
