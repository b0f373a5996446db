"""exml_fast.models: output shapes and the BatchNorm layers each model has."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exml_fast.models import LeNet5, LeNet5BN, resnet18_cifar, resnet34_cifar


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("cls", [LeNet5BN, LeNet5])
@pytest.mark.parametrize("num_classes,in_channels", [(10, 1), (7, 3)])
def test_lenet_shapes(cls, num_classes, in_channels):
    torch.manual_seed(0)
    model = cls(num_classes=num_classes, in_channels=in_channels)
    x = torch.randn(4, in_channels, 32, 32)
    assert model(x).shape == (4, num_classes)
    model.eval()
    assert model(x[:1]).shape == (1, num_classes)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.classifier is linears[-1]
    assert (model.classifier.in_features, model.classifier.out_features) == (84, num_classes)


def test_lenet_batchnorm_layers():
    bn = LeNet5BN()
    assert _count(bn, nn.BatchNorm2d) == 2 and _count(bn, nn.BatchNorm1d) == 2
    assert _count(bn, nn.MaxPool2d) == 2 and _count(bn, nn.ReLU) == 4
    plain = LeNet5()
    assert _count(plain, nn.modules.batchnorm._BatchNorm) == 0
    assert _count(plain, nn.Tanh) == 4 and _count(plain, nn.AvgPool2d) == 2


def test_resnet18_cifar():
    model = resnet18_cifar(num_classes=10)
    assert _count(model, nn.BatchNorm2d) == 20
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert _count(model, nn.MaxPool2d) == 0
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)


@pytest.mark.parametrize("factory,n_bn", [(resnet18_cifar, 20), (resnet34_cifar, 36)])
def test_resnet_cifar_shapes(factory, n_bn):
    torch.manual_seed(0)
    model = factory(num_classes=100, width=8)
    assert _count(model, nn.BatchNorm2d) == n_bn
    assert model.classifier.in_features == 64  # 8 · width
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 100)
    assert model.forward_features(x).shape == (2, 64)
    model.eval()
    assert model(x[:1]).shape == (1, 100)


def test_resnet_downsampling():
    model = resnet18_cifar(width=4)
    x = model.stem(torch.randn(1, 3, 32, 32))
    sizes = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes == [(4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4)]
    shortcuts = [b.shortcut for s in (model.layer2, model.layer3, model.layer4) for b in s[:1]]
    assert all(isinstance(s[0], nn.Conv2d) and s[0].kernel_size == (1, 1) for s in shortcuts)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)


def test_lenet5half_is_lenet5_with_half_the_widths():
    from exml_fast.models import LeNet5, LeNet5Half, build_model

    half, full = LeNet5Half(), LeNet5()
    assert half(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    convs = [m for m in half.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in half.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [3, 8]
    assert [l.out_features for l in linears] == [60, 42, 10]
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters()) / 3
    assert isinstance(build_model("lenet5half", num_classes=5), LeNet5Half)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg")
