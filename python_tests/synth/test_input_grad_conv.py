"""The input-gradient convolution used by synthesis on the CPU against autograd's convolution backward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exml_fast.models import build_model
from exml_fast.synth import ModelInversion
from exml_fast.synth import input_grad_conv as _conv
from exml_fast.synth.input_grad_conv import conv2d_input_grad, input_grad_convs


@pytest.mark.parametrize("cin, cout, k, pad, hw", [(1, 6, (5, 5), (0, 0), 32), (6, 16, (5, 5), (0, 0), 14),
                                                    (3, 8, (3, 3), (1, 1), 9), (4, 4, (1, 1), (0, 0), 7),
                                                    (2, 5, (3, 5), (1, 2), 11), (5, 3, (3, 3), (2, 0), 8)])
def test_input_grad_matches_autograd(cin, cout, k, pad, hw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, cin, hw, hw + 1, generator=g, requires_grad=True)
    w = torch.randn(cout, cin, *k, generator=g)
    y = F.conv2d(x, w, torch.randn(cout, generator=g), padding=pad)
    grad = torch.randn(y.shape, generator=g)
    (want,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(conv2d_input_grad(grad, w, pad), want, rtol=1e-4, atol=1e-4)


def _input_grad(model, x, fast):
    x = x.clone().requires_grad_()
    for p in model.parameters():
        p.requires_grad_(False)
    with input_grad_convs(model) if fast else torch.enable_grad():
        out = model(x)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), gx


@pytest.mark.parametrize("arch", ["lenet5", "lenet5_bn", "resnet18_cifar"])
def test_frozen_model_gives_the_same_outputs_and_input_gradient(arch):
    torch.manual_seed(0)
    kw = {"width": 8} if arch == "resnet18_cifar" else {}
    model = build_model(arch, **kw).eval()
    x = torch.randn(5, 3 if arch == "resnet18_cifar" else 1, 32, 32)
    out, gx = _input_grad(model, x, fast=False)
    out_f, gx_f = _input_grad(model, x, fast=True)
    torch.testing.assert_close(out_f, out, rtol=0, atol=0)
    torch.testing.assert_close(gx_f, gx, rtol=1e-4, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored


def test_swap_is_restored_after_an_error_and_trainable_convs_keep_weight_gradients():
    model = build_model("lenet5")
    with pytest.raises(RuntimeError, match="boom"):
        with input_grad_convs(model):
            assert any("forward" in m.__dict__ for m in model.modules())
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    x = torch.randn(3, 1, 32, 32, requires_grad=True)
    with input_grad_convs(model):  # weights require grad: PyTorch's own backward, weight gradients included
        model(x).sum().backward()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in convs)


def test_ineligible_convs_are_left_alone():
    # Each is ineligible for one reason alone (all have at most 2 input channels but the one that has 4).
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Conv2d(2, 2, 3, dilation=2), nn.Conv2d(2, 2, 3, groups=2),
                          nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1))
    with input_grad_convs(model):
        patched = ["forward" in m.__dict__ for m in model]
    assert patched == [False, False, False, False, False, False, True]


def test_model_inversion_is_unchanged_by_the_swap(monkeypatch):
    torch.manual_seed(0)
    teacher = build_model("lenet5")

    def run():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*has no BatchNorm layer.*")
            synth = ModelInversion(teacher, input_shape=(1, 32, 32), mean=0.1307, std=0.3081, batch_size=16)
        return synth.synthesize(16, classes=[0, 1], iterations=5, generator=3, progress=False).x

    fast = run()
    monkeypatch.setattr(_conv, "FAST_INPUT_GRAD", False)
    torch.testing.assert_close(fast, run(), rtol=1e-4, atol=1e-4)
