"""prune_without_data: the MACs budget on LeNet-5-BN, a CIFAR ResNet-18 and MobileNetV2, the channel scores
against a hand computation, recovery by distillation, the caller's model left alone, and every bad input."""

import sys

import pytest
import torch
from torch import nn

from _util import num_threads
from exml_fast import data
from exml_fast.compress import PruneResult, logits_layer, prune_without_data
import exml_fast.compress.prune as prune_module
from exml_fast.models import LeNet5, LeNet5BN, mobilenet_v2, resnet18_cifar_slim

tp = pytest.importorskip("torch_pruning")

SHAPE = (1, 32, 32)
pytestmark = pytest.mark.filterwarnings("ignore::exml_fast.synth.LowAgreementWarning")  # 2 synthesis steps


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def _assert_untouched(model: nn.Module, snapshot) -> None:
    state, flags = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("build", [
    lambda: LeNet5BN(num_classes=10),
    lambda: resnet18_cifar_slim(num_classes=10, in_channels=1),
    lambda: mobilenet_v2(num_classes=10, in_channels=1),
], ids=["lenet5bn", "resnet18_slim", "mobilenet_v2"])
def test_meets_the_flops_budget_and_keeps_the_classes(build):
    torch.manual_seed(0)
    model = build().train()  # a model in train mode comes back in train mode
    before = _snapshot(model)
    res = prune_without_data(model, SHAPE, n=16, iterations=2, recover_epochs=1, batch_size=8, progress=False)
    assert isinstance(res, PruneResult) and res.importance == "taylor" and res.method == "deepinversion"
    assert res.flops_reduction >= 0.5 and res.macs_after <= 0.5 * res.macs_before
    # at most about one schedule step past the target on these widths
    assert res.flops_reduction < 0.56
    assert res.params_after < res.params_before
    macs, params = tp.utils.count_ops_and_params(res.model, torch.zeros(1, *SHAPE))
    assert (int(macs), int(params)) == (res.macs_after, res.params_after)
    assert not res.model.training and res.synthesis_s > 0 and res.recover_s > 0
    assert res.model(torch.randn(3, *SHAPE)).shape == (3, 10)
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert min(widths) >= 1
    _assert_untouched(model, before)


def test_bn_scale_runs_on_real_images_without_recovery():
    torch.manual_seed(1)
    model = LeNet5BN(num_classes=10).eval()
    res = prune_without_data(model, SHAPE, images=torch.randn(12, *SHAPE), importance="bn_scale", flops_ratio=0.3,
                             recover_epochs=0, progress=False)
    assert res.method == "images" and res.importance == "bn_scale"
    assert res.flops_reduction >= 0.3 and res.synthesis_s == 0 and res.recover_s == 0


def test_taylor_without_batchnorm_on_noise():
    torch.manual_seed(2)
    res = prune_without_data(LeNet5(num_classes=10), SHAPE, method="noise", n=8, recover_epochs=1,
                             progress=False)
    assert res.method == "noise" and res.flops_reduction >= 0.5


class _TwoLayer(nn.Module):
    """conv(1 -> 4) -> [BN] -> ReLU -> mean over the pixels -> Linear(4 -> 3)."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _kept(original: nn.Conv2d, pruned: nn.Conv2d) -> set[int]:
    """The original indices of the output channels ``pruned`` kept (matched by their weights)."""
    return {next(i for i in range(original.out_channels) if torch.equal(original.weight[i], w))
            for w in pruned.weight}


def _ratio_removing_one(model: nn.Module) -> float:
    """A flops_ratio whose target lies between the MACs of ``model`` with 3 and with all 4 of its channels."""
    def macs(width):
        net = _TwoLayer()
        net.conv, net.fc = nn.Conv2d(1, width, 3), nn.Linear(width, 3)
        if isinstance(model.bn, nn.BatchNorm2d):
            net.bn = nn.BatchNorm2d(width)
        return tp.utils.count_ops_and_params(net, torch.zeros(1, 1, 8, 8))[0]
    return 1 - (macs(3) + macs(4)) / 2 / macs(4)


def test_taylor_scores_match_a_hand_computation_and_depend_on_the_images():
    torch.manual_seed(3)
    model = _TwoLayer().eval()
    ratio = _ratio_removing_one(model)
    dropped = []
    for seed in (0, 1):
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * (1 + 2 * seed) + seed
        model.zero_grad()
        logits = model(x)
        nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
        # |sum of w * dL/dw| over the channel's conv filter plus over its column of the classifier (on seed 0 the
        # sum of |w * dL/dw| would drop another channel: 1, not 2)
        conv = (model.conv.weight * model.conv.weight.grad).flatten(1).sum(1).abs()
        fc = (model.fc.weight * model.fc.weight.grad).sum(0).abs()
        dropped.append(int((conv + fc).argmin()))
        model.zero_grad(set_to_none=True)
        res = prune_without_data(model, (1, 8, 8), images=x, flops_ratio=ratio, recover_epochs=0, progress=False)
        assert res.model.conv.out_channels == 3 and res.model.fc.out_features == 3
        assert _kept(model.conv, res.model.conv) == {0, 1, 2, 3} - {dropped[-1]}
    assert dropped == [2, 3]  # the same weights, other images: another channel goes


def test_bn_scale_drops_the_smallest_absolute_gamma():
    model = _TwoLayer(bn=True).eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -3.0, 0.1, 2.0]))
    res = prune_without_data(model, (1, 8, 8), images=torch.randn(4, 1, 8, 8), importance="bn_scale",
                             flops_ratio=_ratio_removing_one(model), recover_epochs=0, progress=False)
    assert _kept(model.conv, res.model.conv) == {0, 1, 3}


def test_logits_layer_is_the_last_layer_run_with_the_class_count():
    model = LeNet5BN(num_classes=10)
    assert logits_layer(model, torch.zeros(1, *SHAPE), 10, "t") is model.classifier
    with pytest.raises(ValueError, match="t: cannot find the layer that makes LeNet5BN's 7 logits"):
        logits_layer(model, torch.zeros(1, *SHAPE), 7, "t")


@pytest.fixture(scope="module")
def mnist_lenet():
    """A LeNet-5-BN trained for 64 steps on 2000 MNIST digits (about 92 % test accuracy), 1000 test digits."""
    if data.find_data_root("mnist") is None:
        pytest.skip("MNIST files not found (set EXML_FAST_DATA)")
    from exml_fast.training import train_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = data.mnist_tensors("train")
        torch.manual_seed(0)
        model = train_classifier(LeNet5BN(num_classes=10), x[:2000], y[:2000], epochs=2, lr=0.05,
                                 generator=torch.Generator().manual_seed(0), schedule="cosine")
    finally:
        torch.set_num_threads(threads)
    return model, data.mnist_tensors("test")[0][:1000]


def test_recovery_on_synthetic_images_brings_the_pruned_model_back_to_its_teacher(mnist_lenet):
    model, x_test = mnist_lenet
    with torch.no_grad():
        teacher = model(x_test).argmax(1)
    agreement = {}
    for epochs in (0, 30):
        res = prune_without_data(model, SHAPE, data.MNIST_MEAN, data.MNIST_STD, n=64, iterations=50,
                                 recover_epochs=epochs, progress=False)
        with torch.no_grad():
            agreement[epochs] = (res.model(x_test).argmax(1) == teacher).float().mean().item()
    # measured: 0.52 without recovery, 0.93 after 30 epochs
    assert agreement[30] > agreement[0] + 0.2 and agreement[30] > 0.85


@pytest.mark.parametrize("kwargs, length", [({"recover_epochs": 3}, {"epochs": 3}),
                                            ({"recover_epochs": 0, "recover_steps": 5}, {"iterations": 5}),
                                            ({"recover_epochs": 7, "recover_steps": 2}, {"iterations": 2})],
                         ids=["epochs", "steps-over-no-epochs", "steps-replace-epochs"])
def test_recover_steps_replace_the_epochs(monkeypatch, kwargs, length):
    seen = []

    def spy(student, x, **kw):
        seen.append({k: kw[k] for k in ("epochs", "iterations") if k in kw})
        return student

    monkeypatch.setattr(prune_module, "distill", spy)
    res = prune_without_data(LeNet5BN().eval(), SHAPE, images=torch.randn(16, *SHAPE), progress=False, **kwargs)
    assert seen == [length] and res.recover_s >= 0


def test_channels_name_the_kept_originals_and_the_running_means_come_back():
    torch.manual_seed(0)
    model = LeNet5BN(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    res = prune_without_data(model, SHAPE, images=torch.randn(32, *SHAPE), recover_epochs=0, progress=False)
    originals, pruned = dict(model.named_modules()), dict(res.model.named_modules())
    assert sorted(res.channels) == ["features.1", "features.10", "features.13", "features.5"]
    for name, kept in res.channels.items():
        assert kept.dtype == torch.int64 and torch.all(kept[1:] > kept[:-1])
        assert kept.numel() == pruned[name].num_features < originals[name].num_features
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(pruned[name], key), getattr(originals[name], key)[kept])
    # the first convolution's input is whole, so its kept filters are the original's rows
    assert torch.equal(res.model.features[0].weight, model.features[0].weight[res.channels["features.1"]])


@pytest.mark.parametrize("build", [lambda: resnet18_cifar_slim(num_classes=10, in_channels=1),
                                   lambda: mobilenet_v2(num_classes=10, in_channels=1)],
                         ids=["resnet18_slim", "mobilenet_v2"])
def test_feature_weight_matches_every_batchnorm_on_its_kept_channels(monkeypatch, build):
    torch.manual_seed(0)
    model = build().eval()
    seen = {}
    real_distill = prune_module.distill

    def spy(student, x, **kw):
        seen.update(kw)
        return real_distill(student, x, **kw)

    monkeypatch.setattr(prune_module, "distill", spy)
    res = prune_without_data(model, SHAPE, images=torch.randn(8, *SHAPE), recover_steps=1, batch_size=4,
                             feature_weight=3.0, progress=False)
    bns = [m for m in res.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert seen["feature_weight"] == 3.0 and [s for s, _, _ in seen["features"]] == bns
    originals = dict(model.named_modules())
    for (_, teacher_bn, kept), (name, kept_too) in zip(seen["features"], res.channels.items()):
        assert teacher_bn is originals[name] and kept is kept_too
    # by default at weight 10; at 0, logits only
    seen.clear()
    prune_without_data(model, SHAPE, images=torch.randn(8, *SHAPE), recover_steps=1, batch_size=4, progress=False)
    assert seen["feature_weight"] == 10.0 and len(seen["features"]) == len(bns)
    seen.clear()
    prune_without_data(model, SHAPE, images=torch.randn(8, *SHAPE), recover_steps=1, batch_size=4,
                       feature_weight=0.0, progress=False)
    assert "features" not in seen
    assert (seen["rotate"], seen["scale"]) == (0.0, 0.0)  # no rotation or zoom by default; passed through
    prune_without_data(model, SHAPE, images=torch.randn(8, *SHAPE), recover_steps=1, batch_size=4, rotate=15,
                       scale=0.15, progress=False)
    assert (seen["rotate"], seen["scale"]) == (15.0, 0.15)


class _NumpyInTheMiddle(_TwoLayer):
    """Runs under no_grad (check_classifier) but not under autograd (Torch-Pruning's trace)."""

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(torch.from_numpy(h.numpy()))


class _Detached(_TwoLayer):
    def forward(self, x):
        with torch.no_grad():
            h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(h)


@pytest.mark.parametrize("call, error, match", [
    (lambda: prune_without_data("lenet", SHAPE), TypeError, "model must be an nn.Module"),
    (lambda: prune_without_data(nn.Conv2d(1, 2, 3), SHAPE), ValueError, "model must be a classifier"),
    (lambda: prune_without_data(LeNet5BN(), (3, 32, 32)), ValueError, "does not take inputs of input_shape"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, flops_ratio=0), ValueError, "flops_ratio must be a finite"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, flops_ratio=1.0), ValueError,
     r"flops_ratio must be a fraction in \(0, 1\)"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, flops_ratio=-0.2), ValueError, "flops_ratio"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, importance="l1"), ValueError,
     "importance must be one of taylor, bn_scale; got 'l1'"),
    (lambda: prune_without_data(LeNet5(), SHAPE, importance="bn_scale"), ValueError,
     r"importance='bn_scale' ranks channels by the \|gamma\| of"
     " their BatchNorm, but LeNet5 has no BatchNorm layer; "
     "use importance='taylor'"),
    (lambda: prune_without_data(LeNet5(), SHAPE), ValueError,
     "method='deepinversion' matches BatchNorm statistics, but LeNet5 has no BatchNorm.*method='noise'"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, images=torch.randn(4, 1, 28, 28)), ValueError,
     r"images must be \(N, 1, 32, 32\) with N >= 1"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, images=torch.zeros(4, 1, 32, 32, dtype=torch.int64)),
     TypeError, "images must be a float tensor"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, recover_epochs=-1), ValueError, "recover_epochs must be an int"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, recover_steps=0), ValueError,
     "recover_steps must be an int >= 1"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, temperature=0), ValueError, "temperature must be"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, n=0), ValueError, "n must be an int >= 1"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, feature_weight=-1.0), ValueError,
     "feature_weight must be a finite number >= 0"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, rotate=-1.0), ValueError, "rotate must be a finite number >= 0"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, rotate=200), ValueError,
     r"rotate must be an angle in \[0, 180\] degrees; got 200"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, scale=1.0), ValueError,
     r"scale must be a zoom range in \[0, 1\); got 1.0"),
    (lambda: prune_without_data(_NumpyInTheMiddle(), (1, 8, 8), images=torch.randn(4, 1, 8, 8)), ValueError,
     "Torch-Pruning cannot trace _NumpyInTheMiddle"),
    (lambda: prune_without_data(_Detached(), (1, 8, 8), images=torch.randn(4, 1, 8, 8)), ValueError,
     "Torch-Pruning finds no channel it can remove in _Detached"),
    (lambda: prune_without_data(LeNet5BN(), SHAPE, images=torch.randn(4, *SHAPE), flops_ratio=0.95,
                                recover_epochs=0), ValueError, "flops_ratio cannot be reached"),
], ids=["not-module", "not-classifier", "shape", "ratio-0", "ratio-1", "ratio-neg", "importance", "bn_scale-no-bn",
        "di-no-bn", "images-shape", "images-int", "epochs", "steps", "temperature", "n", "feature-weight",
        "rotate-neg", "rotate-big", "scale-1", "untraceable", "no-channels",
        "unreachable"])
def test_bad_inputs_name_the_argument(call, error, match):
    with pytest.raises(error, match=f"prune_without_data: .*{match}" if "prune_without_data" not in match
                       else match):
        call()


def test_missing_torch_pruning_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"pip install exml_fast\[compress\]"):
        prune_without_data(LeNet5BN(), SHAPE, images=torch.randn(4, *SHAPE))
