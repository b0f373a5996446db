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
    assert [lin.out_features for lin in linears] == [60, 42, 10]
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters()) / 3
    assert isinstance(build_model("lenet5half", num_classes=5), LeNet5Half)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg")


# ----------------------------------------------------------------------------- the data-free KD papers' LeNets

@pytest.mark.parametrize("name,params,convs,dense,conv_fc1", [
    # Data Impressions §4.1.2.1: "61706 and 35820 parameters"; only the convolutions are halved
    ("lenet5_zskd", 61706, [6, 16], [120, 84, 10], False),
    ("lenet5_half_zskd", 35820, [3, 8], [120, 84, 10], False),
    # DAFL / DFAD lenet.py: conv5 is a 5x5 convolution to 120 (60 in the half), every layer halved
    ("lenet5_dafl", 61706, [6, 16, 120], [84, 10], True),
    ("lenet5_half_dafl", 15738, [3, 8, 60], [42, 10], True),
])
def test_paper_lenets_have_the_published_widths_and_parameter_counts(name, params, convs, dense, conv_fc1):
    from exml_fast.models import ARCHS, FeatureTap

    torch.manual_seed(0)
    model = ARCHS[name](num_classes=10, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) == params
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == convs
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == dense
    # ReLU and max-pooling, not the ExML LeNet's Tanh and average pooling
    assert _count(model, nn.ReLU) == 4 and _count(model, nn.MaxPool2d) == 2
    assert _count(model, nn.Tanh) == 0 and _count(model, nn.AvgPool2d) == 0
    x = torch.rand(5, 1, 32, 32)
    assert model(x).shape == (5, 10)
    with FeatureTap(model) as tap:
        logits = model(x)
        torch.testing.assert_close(model.classifier(tap.features), logits)
        assert tap.features.shape == (5, 84 if name.endswith("zskd") or name == "lenet5_dafl" else 42)
    if conv_fc1:  # DAFL's `out_feature`, its activation term's input: conv5's activations after the ReLU
        conv5 = model.features[6]
        assert isinstance(conv5, nn.Conv2d) and isinstance(model.features[7], nn.ReLU)
        with FeatureTap(model, layer="features.7") as tap:
            model(x)
            assert tap.features.shape == (5, convs[-1])
            torch.testing.assert_close(tap.features, torch.relu(conv5(model.features[:6](x))).flatten(1))
    assert ARCHS[name](num_classes=3, in_channels=2)(torch.rand(2, 2, 32, 32)).shape == (2, 3)


def test_dafl_conv5_computes_what_a_linear_layer_would():
    """DAFL's conv5 over the 5x5 map is a dense layer: same outputs as Linear with the reshaped weight."""
    from exml_fast.models import LeNet5DAFL

    torch.manual_seed(0)
    model = LeNet5DAFL()
    conv5 = [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    h = torch.randn(4, 16, 5, 5)
    torch.testing.assert_close(conv5(h).flatten(1), nn.functional.linear(h.flatten(1), conv5.weight.flatten(1),
                                                                         conv5.bias))


# ------------------------------------------------------------------------------------------- the registry

ISSUE_ARCHS = ["lenet5", "lenet5_bn", "lenet5_half", "lenet5_zskd", "lenet5_half_zskd", "lenet5_dafl",
               "lenet5_half_dafl", "resnet18_cifar", "resnet18_cifar_slim", "resnet34_cifar",
               "resnet32", "mobilenet_v2"]


@pytest.mark.parametrize("name", ISSUE_ARCHS)
def test_every_arch_builds_from_num_classes_and_in_channels(name):
    from exml_fast.models import ARCHS, build_model

    small = {"resnet18_cifar": {"width": 4}, "resnet34_cifar": {"width": 4}, "mobilenet_v2": {"width_mult": 0.25}}
    torch.manual_seed(0)
    model = ARCHS[name](num_classes=7, in_channels=2, **small.get(name, {}))
    model.eval()
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 7)
    again = build_model(name, num_classes=7, in_channels=2, **small.get(name, {}))
    assert type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_old_lenet_names_are_aliases():
    from exml_fast.models import ARCHS

    assert ARCHS["lenet5bn"] is ARCHS["lenet5_bn"] is LeNet5BN
    assert ARCHS["lenet5half"] is ARCHS["lenet5_half"]


def test_resnet18_slim_is_width_20():
    from exml_fast.models import build_model

    slim = build_model("resnet18_cifar_slim", num_classes=10)
    assert slim.stem[0].out_channels == 20 and slim.classifier.in_features == 160
    assert list(slim.state_dict()) == list(resnet18_cifar(width=20).state_dict())
    assert build_model("resnet18_cifar", num_classes=10, width=20).classifier.in_features == 160


def test_resnet32_is_the_classic_cifar_resnet():
    from exml_fast.models import resnet32

    model = resnet32(num_classes=10)
    assert model.num_stages == 3 and not hasattr(model, "layer4")
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert [s[0].conv1.out_channels for s in (model.layer1, model.layer2, model.layer3)] == [16, 32, 64]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 32  # 31 3x3 convs + the classifier = 32 weighted layers
    assert sum(p.numel() for p in model.parameters()) == 466_906  # 1x1-conv shortcuts (option B)
    x = model.stem(torch.randn(1, 3, 32, 32))
    assert model.layer3(model.layer2(model.layer1(x))).shape == (1, 64, 8, 8)


def test_mobilenet_v2_in_channels():
    from exml_fast.models import mobilenet_v2

    model = mobilenet_v2(num_classes=5, in_channels=1, width_mult=0.25)
    first = model.features[0][0]
    assert first.in_channels == 1 and first.stride == (2, 2)
    assert model.classifier[-1].out_features == 5
    with pytest.raises(ValueError, match="in_channels"):
        mobilenet_v2(num_classes=5, in_channels=0)


def test_register_arch(monkeypatch):
    from exml_fast import models

    monkeypatch.setattr(models, "ARCHS", dict(models.ARCHS))

    def tiny(num_classes=10, in_channels=1, hidden=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))

    models.register_arch("tiny_mlp", tiny)
    model = models.build_model("tiny_mlp", num_classes=3, in_channels=1, hidden=5)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3) and model[1].out_features == 5
    with pytest.raises(ValueError, match="'tiny_mlp' is already registered.*overwrite=True"):
        models.register_arch("tiny_mlp", tiny)
    with pytest.raises(ValueError, match="already registered"):
        models.register_arch("lenet5", tiny)
    models.register_arch("lenet5", tiny, overwrite=True)
    assert isinstance(models.build_model("lenet5", num_classes=2), nn.Sequential)
    with pytest.raises(ValueError, match="non-empty string"):
        models.register_arch("", tiny)
    with pytest.raises(TypeError, match="callable"):
        models.register_arch("x", 3)
