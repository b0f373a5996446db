"""exml_fast.ops.dirichlet_targets against exml_fast.reference (class_similarity: test_class_similarity.py).

dirichlet_targets draws from another random stream than torch, so it is
tested statistically: means and variances of 1e5 draws against the exact
Dirichlet moments (5 standard errors of each estimator, from the exact 2nd
and 4th central moments of the Beta marginals), and two-sample
Kolmogorov-Smirnov tests of every marginal against torch.distributions.Dirichlet
at level 1e-3. Seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _util import DEVICES, requires_ops

from exml_fast.ops.class_similarity import class_similarity
from exml_fast.ops.dirichlet import dirichlet_targets
from exml_fast.reference.class_similarity import class_similarity as ref_class_similarity

pytestmark = requires_ops


# -- dirichlet_targets: statistics ---------------------------------------------------


def beta_moments(alpha: np.ndarray):
    """Mean, variance and 4th central moment of each Dirichlet marginal
    X_k ~ Beta(alpha_k, alpha0 - alpha_k), from the raw moments
    E[X^r] = prod_{i<r} (alpha_k + i) / (alpha0 + i)."""
    a = alpha.astype(np.float64)
    a0 = a.sum()
    m = [np.prod([(a + i) / (a0 + i) for i in range(r)], axis=0) for r in range(1, 5)]
    m1, m2, m3, m4 = m
    var = m2 - m1**2
    mu4 = m4 - 4 * m3 * m1 + 6 * m2 * m1**2 - 3 * m1**4
    return m1, var, mu4


def check_moments(samples: torch.Tensor, alpha: np.ndarray, sigmas: float = 5.0):
    x = samples.double().cpu().numpy()
    n = x.shape[0]
    mean, var, mu4 = beta_moments(alpha)
    np.testing.assert_allclose(mean, alpha / alpha.sum(), rtol=1e-12)
    np.testing.assert_allclose(var, alpha * (alpha.sum() - alpha) / (alpha.sum() ** 2 * (alpha.sum() + 1)),
                               rtol=1e-9)
    m_hat = x.mean(axis=0)
    v_hat = x.var(axis=0, ddof=1)
    se_mean = np.sqrt(var / n)
    se_var = np.sqrt((mu4 - var**2) / n + 2 * var**2 / (n * (n - 1)))
    z_mean = np.abs(m_hat - mean) / se_mean
    z_var = np.abs(v_hat - var) / se_var
    assert z_mean.max() < sigmas, f"means off by {z_mean.max():.2f} standard errors: {m_hat} vs {mean}"
    assert z_var.max() < sigmas, f"variances off by {z_var.max():.2f} standard errors: {v_hat} vs {var}"


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def ks_critical(n: int, m: int, c_alpha: float = 1.949) -> float:  # level 1e-3
    return c_alpha * np.sqrt((n + m) / (n * m))


def _mixed_alpha(beta: float) -> np.ndarray:
    w = torch.randn(10, 84, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return (beta * ref_class_similarity(w)[3]).numpy()


ALPHAS = {
    "all_0.05": np.full(10, 0.05),
    "all_20": np.full(10, 20.0),
    "mixed_beta10": _mixed_alpha(10.0),
    "mixed_beta0.1": _mixed_alpha(0.1),
}


@pytest.mark.parametrize("name", list(ALPHAS))
def test_dirichlet_moments_and_ks(name):
    alpha = ALPHAS[name]
    n = 100_000
    conc = torch.from_numpy(alpha).float().expand(n, -1)
    g = torch.Generator().manual_seed(2024)
    y = dirichlet_targets(conc, generator=g)
    assert y.dtype == torch.float32 and y.shape == (n, alpha.size)
    assert torch.isfinite(y).all()
    check_moments(y, alpha.astype(np.float32).astype(np.float64))
    m = 50_000
    # torch samples in fp64, then rounds to fp32 as ours are: entries below the
    # fp32 range (alpha = 1e-3 gives ~e^-1000) are 0 in both.
    torch.manual_seed(2025)
    theirs = torch.distributions.Dirichlet(conc[:m].double()).sample().float().double().numpy()
    crit = ks_critical(n, m)
    for k in range(alpha.size):
        d = ks_two_sample(y[:, k].double().numpy(), theirs[:, k])
        assert d < crit, f"marginal {k}: KS statistic {d:.4f} >= critical {crit:.4f}"


def test_moment_check_can_fail():
    """The moment and KS checks reject a slightly wrong law (alpha off by 3%)."""
    alpha = np.full(10, 20.0)
    conc = torch.full((100_000, 10), 20.0 * 1.03)
    conc[:, 0] = 20.0
    y = dirichlet_targets(conc, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError, match="standard errors"):
        check_moments(y, alpha)
    # ... and so does the KS test, against Dirichlet(20) samples.
    torch.manual_seed(0)
    theirs = torch.distributions.Dirichlet(torch.full((50_000, 10), 20.0)).sample()
    assert ks_two_sample(y[:, 0].double().numpy(), theirs[:, 0].double().numpy()) > ks_critical(100_000, 50_000)


# -- dirichlet_targets: properties ------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_dirichlet_rows_sum_to_one_and_extremes(device):
    conc = torch.cat([
        torch.full((500, 7), 1e-3), torch.full((500, 7), 1e3),
        torch.tensor([[1e-3, 1e3, 0.5, 1.0, 2.0, 1e-30, 7.0]]).expand(500, -1),
        torch.full((500, 7), 1.0),
    ]).to(device)
    y = dirichlet_targets(conc, generator=torch.Generator(device).manual_seed(0))
    assert torch.isfinite(y).all() and float(y.min()) >= 0
    torch.testing.assert_close(y.sum(1), torch.ones(y.shape[0], device=device), atol=8 * 7 * 6e-8, rtol=0)
    peaky = y[:500].amax(1)
    assert float(peaky.median()) > 0.99  # alpha = 1e-3: nearly one-hot
    flat = y[500:1000]
    assert float((flat - 1 / 7).abs().max()) < 0.02  # alpha = 1e3: nearly uniform
    # Long rows (K = 1000, tiny alpha), as ImageNet-size Data Impressions.
    y = dirichlet_targets(torch.full((3, 1000), 1e-4, device=device),
                          generator=torch.Generator(device).manual_seed(1))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.sum(1), torch.ones(3, device=device), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_dirichlet_determinism(device):
    conc = (torch.rand(64, 13, generator=torch.Generator().manual_seed(0)) * 3 + 0.01).to(device)
    a = dirichlet_targets(conc, generator=torch.Generator(device).manual_seed(7))
    b = dirichlet_targets(conc, generator=torch.Generator(device).manual_seed(7))
    c = dirichlet_targets(conc, generator=torch.Generator(device).manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and float((a - c).abs().max()) > 0.1
    # The default generator follows torch.manual_seed.
    torch.manual_seed(3)
    d = dirichlet_targets(conc)
    torch.manual_seed(3)
    assert torch.equal(d, dirichlet_targets(conc))
    # Consecutive calls advance the generator.
    g = torch.Generator(device).manual_seed(7)
    assert not torch.equal(dirichlet_targets(conc, generator=g), dirichlet_targets(conc, generator=g))


def test_dirichlet_independent_of_thread_count():
    conc = torch.rand(3000, 10, generator=torch.Generator().manual_seed(0)) * 2 + 0.02
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = dirichlet_targets(conc, generator=torch.Generator().manual_seed(5))
        torch.set_num_threads(2)
        b = dirichlet_targets(conc, generator=torch.Generator().manual_seed(5))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_dirichlet_philox_known_answers(device):
    """Philox4x32-10 against the known-answer vectors of Random123."""
    def run(ctr, key):
        k = key[0] | (key[1] << 32)
        k = k - 2**64 if k >= 2**63 else k
        out = torch.ops.exml_fast._philox4x32_10(torch.tensor([ctr], device=device),
                                                 torch.tensor([k], device=device))
        return out.cpu().tolist()[0]
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, expect in cases:
        assert run(ctr, key) == expect


@pytest.mark.parametrize("device", DEVICES)
def test_dirichlet_dtypes_layouts_and_grad(device):
    g = torch.Generator().manual_seed(0)
    conc = (torch.rand(40, 9, generator=g) * 4 + 0.05).to(device)
    conc16 = conc.half()
    key_seed = 9
    base = dirichlet_targets(conc16.float(), generator=torch.Generator(device).manual_seed(key_seed))
    for c in (conc16, conc16.double(), conc16.float().t().contiguous().t()):
        y = dirichlet_targets(c, generator=torch.Generator(device).manual_seed(key_seed))
        assert torch.equal(y, base), c.dtype  # computed in fp32 from the same fp32 values
    bf = conc.bfloat16()
    y = dirichlet_targets(bf, generator=torch.Generator(device).manual_seed(1))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    # Non-contiguous (a transposed view) equals its contiguous copy.
    t = conc.t().contiguous().t()
    assert not t.is_contiguous()
    torch.testing.assert_close(dirichlet_targets(t, generator=torch.Generator(device).manual_seed(4)),
                               dirichlet_targets(conc, generator=torch.Generator(device).manual_seed(4)),
                               rtol=0, atol=0)
    # requires_grad input: a plain sample, no graph.
    r = conc.clone().requires_grad_(True)
    y = dirichlet_targets(r)
    assert y.grad_fn is None and not y.requires_grad
    # Empty batch.
    assert dirichlet_targets(torch.ones(0, 4, device=device)).shape == (0, 4)


def test_dirichlet_key_is_drawn_in_cpp_as_randint_would():
    """The CPU op draws its key from the generator in C++: the value torch.randint(-2**63, 2**63 - 1) draws (so a
    seed gives the samples it gave when the key was drawn in Python), one draw a call, empty batches too."""
    conc = torch.rand(50, 7, generator=torch.Generator().manual_seed(0)) + 0.05
    g, mirror = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)

    def key():
        return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, generator=mirror)

    for c in (conc, conc[:0], conc):
        y = dirichlet_targets(c, generator=g)
        assert torch.equal(y, torch.ops.exml_fast.dirichlet_sample(c, key()))
        assert torch.equal(g.get_state(), mirror.get_state())
    with pytest.raises(RuntimeError, match="a key or a generator, not both"):
        torch.ops.exml_fast.dirichlet_sample(conc, key(), torch.Generator())


def test_dirichlet_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        dirichlet_targets(torch.ones(5))
    with pytest.raises(TypeError, match="float32"):
        dirichlet_targets(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="K >= 1"):
        dirichlet_targets(torch.ones(2, 0))
    with pytest.raises(TypeError, match="torch.Generator"):
        dirichlet_targets(torch.ones(2, 3), generator=123)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        c = torch.ones(4, 3)
        c[2, 1] = bad
        with pytest.raises(RuntimeError, match="row 2"):
            dirichlet_targets(c)
    c = torch.ones(4, 3, dtype=torch.float64)
    c[1, 0] = 1e-50  # positive in fp64, 0 in fp32
    with pytest.raises(RuntimeError, match="row 1"):
        dirichlet_targets(c)
    with pytest.raises(RuntimeError, match="1-element int64"):  # the C++ check
        torch.ops.exml_fast.dirichlet_sample(torch.ones(2, 2), torch.ones(1))


def test_dirichlet_opcheck():
    conc = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    key = torch.tensor([123456789012345], dtype=torch.int64)
    torch.library.opcheck(torch.ops.exml_fast.dirichlet_sample.default, (conc, key))
    torch.library.opcheck(torch.ops.exml_fast.dirichlet_sample.default, (conc.double(), key))
    torch.library.opcheck(torch.ops.exml_fast._philox4x32_10.default,
                          (torch.randint(0, 2**32, (5, 4)), key))


def test_dirichlet_compile_fullgraph():
    torch._dynamo.reset()
    w = torch.randn(10, 84)
    y = torch.arange(32) % 10

    def targets(w, y):
        return dirichlet_targets(10.0 * class_similarity(w)[y])

    out = torch.compile(targets, fullgraph=True)(w, y)
    assert out.shape == (32, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(32), atol=1e-5, rtol=0)


# -- CUDA ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dirichlet_cuda_matches_cpu_with_same_key():
    conc = torch.cat([torch.rand(3000, 10, generator=torch.Generator().manual_seed(0)) * 5 + 1e-3,
                      torch.full((1000, 10), 0.05)])
    cpu = dirichlet_targets(conc, generator=torch.Generator().manual_seed(42))
    gpu = dirichlet_targets(conc.cuda(), generator=torch.Generator().manual_seed(42)).cpu()
    # Same Philox draws; libm rounding (and, rarely, an acceptance decision at
    # the edge) may differ: nearly every row agrees to a few fp32 ulps.
    close = torch.isclose(gpu, cpu, rtol=1e-5, atol=1e-7).all(dim=1)
    assert float(close.float().mean()) > 0.999
    with pytest.raises(ValueError, match="generator is on cuda"):
        dirichlet_targets(torch.ones(2, 3), generator=torch.Generator("cuda"))
    bad = torch.ones(3, 4, device="cuda")
    bad[1, 2] = -1
    y = dirichlet_targets(bad)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("k", [1, 3, 4, 5, 8, 9, 16, 17, 40])
def test_dirichlet_cuda_row_groups_of_every_width(k):
    """Rows of K <= 16 share a warp (4, 8 or 16 lanes a row): a NaN row beside valid ones in the same warp, a
    last block only partly filled (37 rows), and the CPU kernel's values for the same key."""
    conc = torch.rand(37, k, generator=torch.Generator().manual_seed(k)) * 3 + 0.05
    valid = conc.clone()
    conc[5, 0] = -1.0
    # The CPU kernel raises on the bad row (the CUDA one cannot without a host sync): its values for the other
    # rows come from the same input with row 5 valid (each row's draws depend on the key and the row only).
    with pytest.raises(RuntimeError, match="row 5 is"):
        dirichlet_targets(conc, generator=torch.Generator().manual_seed(7))
    cpu = dirichlet_targets(valid, generator=torch.Generator().manual_seed(7))
    gpu = dirichlet_targets(conc.cuda(), generator=torch.Generator().manual_seed(7)).cpu()
    assert torch.isnan(gpu[5]).all()
    ok = torch.ones(37, dtype=torch.bool)
    ok[5] = False
    assert torch.isfinite(gpu[ok]).all()
    torch.testing.assert_close(gpu[ok].sum(1), torch.ones(36), rtol=1e-5, atol=1e-5)
    close = torch.isclose(gpu[ok], cpu[ok], rtol=1e-5, atol=1e-7).all(dim=1)
    assert float(close.float().mean()) > 0.97


def _key_from_philox_state(seed: int, offset: int, device: str) -> int:
    """dirichlet::key_from_philox_state (dirichlet_sampler.h) through the Philox op: words x (low) and y (high)
    at counter (offset_lo, offset_hi, 0, 0) under the key `seed`, as a signed int64."""
    k = seed - 2**64 if seed >= 2**63 else seed
    ctr = torch.tensor([[offset & 0xFFFFFFFF, offset >> 32, 0, 0]], device=device)
    w = torch.ops.exml_fast._philox4x32_10(ctr, torch.tensor([k], device=device)).cpu()[0].tolist()
    key = w[0] | (w[1] << 32)
    return key - 2**64 if key >= 2**63 else key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dirichlet_cuda_derives_its_key_in_the_kernel():
    """With a CUDA generator the kernel derives the key from the generator's Philox (seed, offset), which the
    call moves on by 4: no host sync, no copy (and a CPU generator's key goes by value: no copy either)."""
    conc = (torch.rand(300, 10, generator=torch.Generator().manual_seed(0)) * 3 + 0.01).cuda()
    g = torch.Generator("cuda").manual_seed(123)
    dirichlet_targets(conc, generator=g)  # an offset other than 0
    seed, offset = g.initial_seed(), g.get_offset()
    cpu_gen = torch.Generator().manual_seed(5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = dirichlet_targets(conc, generator=g)
        y_cpu_gen = dirichlet_targets(conc, generator=cpu_gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert g.get_offset() == offset + 4
    key = _key_from_philox_state(seed, offset, "cuda")
    assert torch.equal(y, torch.ops.exml_fast.dirichlet_sample(conc, torch.tensor([key], device="cuda")))
    assert not torch.equal(y, dirichlet_targets(conc, generator=g))  # the next call: another key
    expect = dirichlet_targets(conc.cpu(), generator=torch.Generator().manual_seed(5))
    close = torch.isclose(y_cpu_gen.cpu(), expect, rtol=1e-5, atol=1e-7).all(dim=1)
    assert float(close.float().mean()) > 0.99


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dirichlet_cuda_graph_replays_draw_fresh_targets():
    """Captured in a CUDA graph with the default generator, every replay draws under a new key."""
    conc = torch.full((64, 10), 0.5, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dirichlet_targets(conc)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dirichlet_targets(conc)
    graph.replay()
    a = out.clone()
    graph.replay()
    b = out.clone()
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.equal(a, b)
    torch.testing.assert_close(a.sum(1), torch.ones(64, device="cuda"), atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["all_0.05", "all_20", "mixed_beta0.1"])
def test_dirichlet_moments_cuda(name):
    alpha = ALPHAS[name]
    conc = torch.from_numpy(alpha).float().cuda().expand(100_000, -1)
    y = dirichlet_targets(conc, generator=torch.Generator("cuda").manual_seed(2024))
    check_moments(y, alpha.astype(np.float32).astype(np.float64))


# -- fallback ---------------------------------------------------------------------------


def test_fallback_without_extension():
    code = (
        "import torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import exml_fast\n"
        "from exml_fast.ops.class_similarity import class_similarity\n"
        "from exml_fast.ops.dirichlet import dirichlet_targets\n"
        "assert not exml_fast.has_ops()\n"
        "w = torch.randn(10, 84, requires_grad=True)\n"
        "c = class_similarity(w)\n"
        "c.sum().backward()\n"
        "y = dirichlet_targets(10 * c.detach()[torch.arange(50) % 10], generator=torch.Generator().manual_seed(0))\n"
        "assert y.shape == (50, 10) and abs(float(y.sum()) - 50) < 1e-4\n"
        "try:\n"
        "    dirichlet_targets(-torch.ones(2, 2))\n"
        "    raise SystemExit('no error')\n"
        "except RuntimeError as e:\n"
        "    assert 'row 0' in str(e)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, EXML_FAST_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_dirichlet_same_bits_for_both_cpu_isas():
    """The baseline, AVX2 and native (AVX-512 where the CPU has it) builds of the
    vectorised CPU loops give the same bits."""
    code = (
        "import torch, exml_fast\n"
        "from exml_fast.ops.dirichlet import dirichlet_targets\n"
        "c = torch.rand(2000, 13, generator=torch.Generator().manual_seed(0)) * 3 + 0.01\n"
        "y = dirichlet_targets(c, generator=torch.Generator().manual_seed(1))\n"
        "torch.save(y, __import__('sys').argv[1])\n"
    )
    import tempfile

    outs = []
    with tempfile.TemporaryDirectory() as d:
        for isa in ("base", "avx2", "native"):
            path = os.path.join(d, f"{isa}.pt")
            env = dict(os.environ, EXML_FAST_CPU_ISA=isa)
            r = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            outs.append(torch.load(path))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
