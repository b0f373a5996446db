"""BNStatsMatcher: which layers it hooks, the numbers it gives, hook hygiene."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _util import DEVICES

from exml_fast import BNStatsMatcher
from exml_fast import reference as ref


class MyBN(nn.BatchNorm2d):
    """A user subclass of BatchNorm2d: must be hooked like its parent."""


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = MyBN(8)
        self.bn_sync = nn.SyncBatchNorm(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.bn3 = nn.BatchNorm1d(10)
        self.no_stats = nn.BatchNorm1d(10, track_running_stats=False)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn_sync(self.bn2(self.conv2(x))))
        return self.no_stats(self.bn3(self.fc(x.flatten(1))))


def make_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    # Give the running statistics non-trivial values, then freeze them.
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 4, 4) * 2 + 1)
    return net.eval()


def manual_terms(net, x, *, form="l2", first=1.0):
    """The expected terms, from inputs captured by plain hooks and the reference loss."""
    captured = []
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats]
    hs = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0])))
          for m in layers]
    try:
        net(x)
    finally:
        for h in hs:
            h.remove()
    terms = []
    for mod, inp in captured:
        t = ref.bn_stats_loss(inp, mod.running_mean, mod.running_var, form=form, eps=mod.eps)
        terms.append(t * (first if mod is layers[0] else 1.0))
    return terms


def hook_count(net) -> int:
    """Pre-hooks plus temporarily replaced forwards (the fused path) on the model's modules."""
    return sum(len(m._forward_pre_hooks) + ("forward" in m.__dict__) for m in net.modules())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("form", ["l2", "mse", "sq_std"])
def test_loss_matches_reference_every_layer(form, requires_grad, fused):
    net = make_net()
    x = torch.randn(5, 3, 4, 4, requires_grad=requires_grad)
    expected = manual_terms(net, x, form=form, first=10.0)
    assert len(expected) == 4  # bn1, bn2 (subclass), bn_sync, bn3; not the stat-less layer
    with BNStatsMatcher(net, form=form, first_bn_multiplier=10.0, fused=fused) as m:
        net(x)
        loss = m.loss()
        per = m.per_layer()
    assert [name for name, _ in per] == ["bn1", "bn2", "bn_sync", "bn3"]
    torch.testing.assert_close(loss, sum(expected), rtol=1e-5, atol=1e-6)
    for (_, got), want in zip(per, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_reaches_input(fused):
    net = make_net()
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    with BNStatsMatcher(net, fused=fused) as m:
        net(x)
        m.loss().backward()
    x2 = x.detach().clone().requires_grad_(True)
    sum(manual_terms(net, x2)).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


def frozen_copy(net):
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_path_equals_hook_path_on_a_frozen_model(channels_last):
    """A frozen eval-mode model (synthesis): outputs, loss and the input gradient of
    (output + BN loss) agree between the fused forward and the hooks."""
    net = frozen_copy(make_net())
    x0 = torch.randn(6, 3, 4, 4)
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    results = []
    for fused in (True, False):
        x = x0.clone().requires_grad_(True)
        with BNStatsMatcher(net, form="l2", first_bn_multiplier=10.0, fused=fused) as m:
            out = net(x)
            total = out.square().mean() + m.loss()
            total.backward()
            results.append((out.detach(), m.loss().detach(), x.grad))
    (o1, l1, g1), (o2, l2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_path_under_autocast(device, dtype, monkeypatch):
    """Under autocast the fused forward runs on CUDA (a frozen teacher in bf16 synthesis), on the
    low-precision input, and its output keeps that dtype as PyTorch's BatchNorm does; on the CPU PyTorch's
    own BatchNorm runs. Output, loss and input gradient agree with the hook path to the dtype's rounding."""
    import exml_fast.synth.matcher as matcher_mod

    calls = []
    real = matcher_mod.frozen_bn_stats
    monkeypatch.setattr(matcher_mod, "frozen_bn_stats", lambda x, *a: calls.append(x.dtype) or real(x, *a))
    net = frozen_copy(make_net()).to(device)
    x0 = torch.randn(6, 3, 4, 4, device=device)
    results = []
    for fused in (True, False):
        x = x0.clone().requires_grad_(True)
        with BNStatsMatcher(net, first_bn_multiplier=10.0, fused=fused) as m, \
                torch.autocast(device, dtype=dtype):
            out = net(x)
            total = out.float().square().mean() + m.loss()
        total.backward()
        patched = sum("forward" in layer.__dict__ for layer in net.modules())
        results.append((out.dtype, out.detach().float(), m.loss().detach(), x.grad))
    (d1, o1, l1, g1), (d2, o2, l2, g2) = results
    assert d1 == d2
    if device == "cpu":
        assert calls == []
    else:
        assert calls and all(c == dtype for c in calls)  # the fused path ran, on the low-precision input
    tol = dict(rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(l1, l2, **tol)
    torch.testing.assert_close(g1, g2, rtol=0.05, atol=1e-3)
    assert patched == 0


def test_fused_path_falls_back_in_train_mode_and_with_trainable_affine():
    """Calls the fused kernel cannot stand for take the hook path, with the same numbers."""
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    expected = manual_terms(make_net(), x)  # parameters require grad
    x_train = torch.randn(5, 3, 4, 4)
    per = {}
    for fused in (True, False):
        net = make_net()
        with BNStatsMatcher(net, fused=fused) as m:
            net(x)
            torch.testing.assert_close(m.loss(), sum(expected), rtol=1e-5, atol=1e-6)
            net.train()  # batch statistics normalise; running statistics update
            out = net(x_train)
            per[fused] = ([t.detach() for _, t in m.per_layer()], out.detach(), net.bn1.running_mean.clone())
        assert hook_count(net) == 0
    for a, b in zip(per[True], per[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_scale_shift_follow_running_stats():
    """The cached affine map is rebuilt when a running statistic changes in place."""
    net = frozen_copy(make_net())
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    with BNStatsMatcher(net) as m:
        a = net(x)
        with torch.no_grad():
            net.bn1.running_var.mul_(2.0)
        b = net(x)
        m.loss()
    with torch.no_grad():
        want = net(x)
    torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, b)


def test_hooks_removed_on_exit_and_on_exception():
    net = make_net()
    before = hook_count(net)
    with BNStatsMatcher(net) as m:
        assert hook_count(net) == before + 5  # model + 4 BN layers
        assert m.active
    assert hook_count(net) == before and not m.active
    with pytest.raises(KeyError):
        with BNStatsMatcher(net):
            net(torch.randn(2, 3, 4, 4))
            raise KeyError("boom")
    assert hook_count(net) == before


def test_hooks_do_not_pile_up_over_repeated_use():
    net = make_net()
    x = torch.randn(3, 3, 4, 4)
    m = BNStatsMatcher(net)
    values = []
    for _ in range(4):
        with m:
            net(x)
            values.append(m.loss().item())
    assert hook_count(net) == 0
    assert values == [values[0]] * 4


def test_each_forward_starts_fresh():
    net = make_net()
    a, b = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4) * 3
    with BNStatsMatcher(net) as m:
        net(a)
        la = m.loss().item()
        net(b)
        lb = m.loss().item()
        net(a)
        assert m.loss().item() == la
        assert len(m.per_layer()) == 4
    assert la != lb


def test_nesting_and_two_matchers_agree():
    net = make_net()
    x = torch.randn(4, 3, 4, 4)
    m1 = BNStatsMatcher(net, first_bn_multiplier=2.0)
    m2 = BNStatsMatcher(net, first_bn_multiplier=2.0)
    with m1:
        with m1:  # re-entering an active matcher keeps a single set of hooks
            assert hook_count(net) == 5
            with m2:
                net(x)
                l1, l2 = m1.loss(), m2.loss()
        assert m1.active and not m2.active
    assert not m1.active and hook_count(net) == 0
    assert l1.item() == l2.item()


def test_module_called_twice_counts_twice():
    bn = nn.BatchNorm1d(4).eval()
    bn.running_mean.fill_(0.5)
    net = nn.Sequential(bn)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x):
            return self.body(self.body(x))

    model = Twice()
    x = torch.randn(8, 4)
    first = ref.bn_stats_loss(x, bn.running_mean, bn.running_var)
    second = ref.bn_stats_loss(bn(x), bn.running_mean, bn.running_var)
    with BNStatsMatcher(model) as m:
        model(x)
        assert len(m.per_layer()) == 2
        torch.testing.assert_close(m.loss(), first + second, rtol=1e-5, atol=1e-6)


def test_bn3d_and_channels_last():
    net = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4)).eval()
    net[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 2, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    with BNStatsMatcher(net) as m:
        net(x)
        got = m.loss()
    inp = net[0](x)
    torch.testing.assert_close(
        got, ref.bn_stats_loss(inp, net[1].running_mean, net[1].running_var), rtol=1e-5, atol=1e-6
    )


def test_model_without_bn():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no BatchNorm layer.*allow_empty=True"):
        BNStatsMatcher(net)
    with BNStatsMatcher(net, allow_empty=True) as m:
        net(torch.randn(2, 3))
        assert m.loss().item() == 0.0
        assert m.per_layer() == []
    assert hook_count(net) == 0


def test_errors():
    net = make_net()
    with pytest.raises(ValueError, match="form must be one of"):
        BNStatsMatcher(net, form="l1")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        BNStatsMatcher(lambda x: x)
    with BNStatsMatcher(net) as m:
        with pytest.raises(RuntimeError, match="no forward of the model"):
            m.loss()


def test_matches_public_deepinversion_hooks():
    """The l2 form equals the public DeepInversion hook's weighted sum."""
    from exml_fast.reference.public.bn_hooks import deepinversion_bn_loss, deepinversion_bn_loss_hooks

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    )
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 3, 8, 8) * 2)
    net.eval()
    x = torch.randn(6, 3, 8, 8)
    hooks = deepinversion_bn_loss_hooks(net)
    try:
        net(x)
        expected = deepinversion_bn_loss(hooks, first_bn_multiplier=10.0)
    finally:
        for h in hooks:
            h.remove()
    with BNStatsMatcher(net, form="l2", first_bn_multiplier=10.0) as m:
        net(x)
        torch.testing.assert_close(m.loss(), expected, rtol=1e-5, atol=1e-6)
