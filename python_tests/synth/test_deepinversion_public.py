"""The public DeepInversion CIFAR loop port (exml_fast.reference.public.deepinversion)
computes what it says: its BN hook loss, TV and l2 terms against the fused ops,
the best batch as a copy, hooks removed (also after an exception), seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exml_fast import ops
from exml_fast.models import resnet18_cifar
from exml_fast.reference.image_priors import tv_l2
from exml_fast.reference.public.bn_hooks import deepinversion_bn_loss, deepinversion_bn_loss_hooks
from exml_fast.reference.public.deepinversion import public_deepinversion

WEIGHTS = dict(bn_reg_scale=5.0, tv_l2_scale=2.5e-5, l2_scale=3e-8)


def tiny_teacher(seed: int = 0) -> nn.Module:
    """A width-8 CIFAR ResNet-18 whose running stats are not the defaults."""
    torch.manual_seed(seed)
    model = resnet18_cifar(width=8)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 0.7 + 0.1)
    return model.eval()


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_bn_hook_loss_equals_fused_bn_stats_loss():
    model = tiny_teacher()
    x = torch.randn(6, 3, 32, 32)
    hooks = deepinversion_bn_loss_hooks(model)
    acts = []
    pre = [m.register_forward_pre_hook(lambda mod, a: acts.append((mod, a[0])))
           for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(x)
        hook_loss = deepinversion_bn_loss(hooks, first_bn_multiplier=1.0)
    finally:
        for h in hooks:
            h.remove()
        for h in pre:
            h.remove()
    assert len(acts) == 20
    fused = sum(ops.bn_stats_loss(a, m.running_mean, m.running_var, form="l2") for m, a in acts)
    torch.testing.assert_close(hook_loss, fused, rtol=1e-5, atol=1e-5)
    assert n_hooks(model) == 0


def test_tv_l2_equals_image_priors():
    x = torch.randn(3, 3, 11, 9, dtype=torch.float64)
    tv = tv_l2(x)
    _, fused_tv_l2, _, l2 = ops.image_priors(x)
    torch.testing.assert_close(tv, fused_tv_l2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.norm(x), l2.sqrt(), rtol=1e-10, atol=1e-10)


def test_first_iteration_terms_match_a_recomputation():
    """Iteration 0's loss terms equal the ones recomputed with the fused ops on the
    same jittered input (the init and the first draw are replayed from the seed)."""
    model = tiny_teacher()
    targets = torch.arange(8) % 10
    seen = {}

    def grab(mod, args, out):
        seen.setdefault("x_jit", args[0].detach().clone())
    h = model.register_forward_hook(grab)
    try:
        _, _, losses = public_deepinversion(model, targets, iterations=1, generator=3, **WEIGHTS)
    finally:
        h.remove()
    x_jit = seen["x_jit"]
    acts = []
    pre = [m.register_forward_pre_hook(lambda mod, a: acts.append((mod, a[0])))
           for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        out = model(x_jit)
    for p in pre:
        p.remove()
    bn = sum(ops.bn_stats_loss(a, m.running_mean, m.running_var) for m, a in acts)
    _, tv, _, l2sq = ops.image_priors(x_jit)
    ce = F.cross_entropy(out, targets)
    torch.testing.assert_close(losses["main"][0], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["bn"][0], bn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["tv_l2"][0], tv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["l2"][0], l2sq.sqrt(), rtol=1e-5, atol=1e-5)
    total = ce + WEIGHTS["bn_reg_scale"] * bn + WEIGHTS["tv_l2_scale"] * tv + WEIGHTS["l2_scale"] * l2sq.sqrt()
    torch.testing.assert_close(losses["total"][0], total, rtol=1e-5, atol=1e-5)
    # The jittered input is a roll (and maybe a flip) of an N(0, 1) init.
    assert x_jit.shape == (8, 3, 32, 32)
    assert abs(float(x_jit.std()) - 1.0) < 0.05


def _untransform_matches(best: torch.Tensor, x_jit: torch.Tensor, jitter: int = 2) -> bool:
    """Whether x_jit is a roll in [-jitter, jitter]^2 (and maybe a flip) of best."""
    for o1 in range(-jitter, jitter + 1):
        for o2 in range(-jitter, jitter + 1):
            r = torch.roll(best, shifts=(o1, o2), dims=(2, 3))
            if torch.equal(r, x_jit) or torch.equal(torch.flip(r, dims=(3,)), x_jit):
                return True
    return False


def test_best_inputs_is_a_copy_of_the_batch_with_the_lowest_loss():
    model = tiny_teacher()
    targets = torch.arange(8) % 10
    costs, seen = [], []
    h = model.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
    try:
        best, best_cost, losses = public_deepinversion(
            model, targets, iterations=6, lr=0.1, generator=1,
            callback=lambda it, loss: costs.append(loss), **WEIGHTS)
    finally:
        h.remove()
    assert len(costs) == 6 and len(seen) == 6 and losses["total"].shape == (6,)
    assert best_cost == pytest.approx(min(costs))
    assert losses["total"].tolist() == pytest.approx(costs)
    k = min(range(6), key=costs.__getitem__)
    # The best batch is the one the teacher saw (jittered) at iteration k, before
    # that iteration's step. The public script's alias would hold the inputs after
    # the last step, which match no iteration's forward input.
    assert _untransform_matches(best, seen[k])
    assert not any(_untransform_matches(best, s) for i, s in enumerate(seen) if i != k)
    assert not best.requires_grad

def test_best_callback_sees_what_a_shorter_call_returns():
    # The time-to-quality race follows the peer's quality along one run: the best batch after iteration k must
    # be, bit for bit, the batch a call of k + 1 iterations from the same seed returns.
    model = tiny_teacher()
    targets = torch.arange(8) % 10
    snaps = {}
    public_deepinversion(model, targets, iterations=7, lr=0.1, generator=3, flip=True,
                         best_callback=lambda it, best: snaps.__setitem__(it, best.clone()), **WEIGHTS)
    assert sorted(snaps) == list(range(7))
    for k in (1, 4, 7):
        short, _, _ = public_deepinversion(model, targets, iterations=k, lr=0.1, generator=3, flip=True, **WEIGHTS)
        assert torch.equal(snaps[k - 1], short)
    assert not torch.equal(snaps[0], snaps[6])  # the runs moved: the check above compares something



def test_hooks_removed_and_mode_restored_also_after_an_exception():
    model = tiny_teacher()
    model.train()
    targets = torch.arange(4)
    before = n_hooks(model)
    public_deepinversion(model, targets, iterations=2, generator=0, **WEIGHTS)
    assert n_hooks(model) == before and model.training

    def boom(it, loss):
        if it == 1:
            raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        public_deepinversion(model, targets, iterations=5, generator=0, callback=boom, **WEIGHTS)
    assert n_hooks(model) == before and model.training


def test_teacher_weight_gradients_are_computed_as_in_the_public_loop():
    model = tiny_teacher()
    targets = torch.arange(4)
    assert all(p.requires_grad for p in model.parameters())
    public_deepinversion(model, targets, iterations=2, generator=0, **WEIGHTS)
    # zero_grad() at the start of an iteration, backward at its end: the last
    # iteration's weight gradients are still there.
    assert all(p.grad is not None for p in model.parameters())
    assert model.training is False  # tiny_teacher returned it in eval mode


def test_seed_reproduces_and_different_seeds_differ():
    model = tiny_teacher()
    targets = torch.arange(8) % 10
    a = public_deepinversion(model, targets, iterations=3, generator=7, **WEIGHTS)
    b = public_deepinversion(model, targets, iterations=3, generator=7, **WEIGHTS)
    c = public_deepinversion(model, targets, iterations=3, generator=8, **WEIGHTS)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1] == b[1]
    torch.testing.assert_close(a[2]["total"], b[2]["total"], rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    d = public_deepinversion(model, targets, iterations=2, generator=g1, **WEIGHTS)
    e = public_deepinversion(model, targets, iterations=2, generator=g2, **WEIGHTS)
    torch.testing.assert_close(d[0], e[0], rtol=0, atol=0)


def test_competition_term():
    teacher = tiny_teacher(0)
    student = tiny_teacher(1)
    student.train()
    targets = torch.arange(8) % 10
    _, _, losses = public_deepinversion(teacher, targets, iterations=2, generator=0,
                                        competitor=student, competition_scale=10.0, **WEIGHTS)
    comp = losses["competition"]
    assert comp.shape == (2,) and bool(((comp >= 0) & (comp <= 1)).all())
    assert student.training  # mode restored
    # Without a competition weight the term is absent; the total then differs by it.
    _, _, plain = public_deepinversion(teacher, targets, iterations=1, generator=0, **WEIGHTS)
    assert "competition" not in plain
    torch.testing.assert_close(losses["total"][0], plain["total"][0] + 10.0 * comp[0],
                               rtol=1e-5, atol=1e-5)
    # 1 - JS of the clamped distributions, recomputed by hand for identical models: JS = 0.
    x = torch.randn(5, 3, 32, 32)
    from exml_fast.reference.public.deepinversion import _competition
    out = teacher(x).detach()
    assert float(_competition(out, out)) == pytest.approx(1.0, abs=1e-6)


def test_use_amp_runs_and_stays_close():
    model = tiny_teacher()
    targets = torch.arange(4)
    _, _, fp32 = public_deepinversion(model, targets, iterations=1, generator=0, **WEIGHTS)
    _, _, amp = public_deepinversion(model, targets, iterations=1, generator=0, use_amp=True,
                                     **WEIGHTS)
    assert float(amp["total"][0]) == pytest.approx(float(fp32["total"][0]), rel=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(iterations=0), "iterations"),
    (dict(iterations=1, jitter=-1), "jitter"),
    (dict(iterations=1, competition_scale=1.0), "competitor"),
    (dict(iterations=1, generator="seed"), "generator"),
])
def test_bad_arguments(kwargs, match):
    model = tiny_teacher()
    with pytest.raises((ValueError, TypeError), match=match):
        public_deepinversion(model, torch.arange(2), **WEIGHTS, **kwargs)


def test_port_objective_equals_the_engine_configured_as_in_bench_synthesis():
    """benches/bench_synthesis.py compares the port with exml_fast.synth.DeepInversion
    configured to the same objective; at the engine's initial batch (no augmentation,
    one iteration: the kept batch is the init) the port's loss terms equal the engine's."""
    synth_mod = pytest.importorskip("exml_fast.synth")
    model = tiny_teacher()
    synth = synth_mod.DeepInversion(
        model, input_shape=(3, 32, 32), mean=None, std=None, num_classes=10, lr=0.1,
        schedule="constant", warmup=0.0, bn_weight=WEIGHTS["bn_reg_scale"], first_bn_multiplier=1.0,
        tv_l2_weight=WEIGHTS["tv_l2_scale"], l2_weight=WEIGHTS["l2_scale"], jitter=0, flip=False)
    batch = synth.synthesize(8, iterations=1, batch_size=8, generator=0, progress=False)
    x, y = batch.x, batch.y
    assert torch.equal(y, torch.arange(8) % 10)
    hooks = deepinversion_bn_loss_hooks(model)
    try:
        with torch.no_grad():
            out = model(x)
        bn = deepinversion_bn_loss(hooks, first_bn_multiplier=1.0)
    finally:
        for h in hooks:
            h.remove()
    ce = F.cross_entropy(out, y)
    total = (ce + WEIGHTS["bn_reg_scale"] * bn + WEIGHTS["tv_l2_scale"] * tv_l2(x)
             + WEIGHTS["l2_scale"] * torch.norm(x, 2))
    torch.testing.assert_close(batch.losses["main"][0], ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.losses["bn"][0], bn, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batch.losses["total"][0], total, rtol=1e-5, atol=1e-4)
