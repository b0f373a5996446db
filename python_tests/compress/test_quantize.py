"""exml_fast.compress: synthetic_images, quantize_without_data, distill_without_data, the compress job and CLI."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from _util import calibrated_bn
from exml_fast import data
from exml_fast.compress import (CALIBRATION_METHODS, distill_without_data, load_exported,
                                quantize_without_data, save_exported, synthetic_images)
from exml_fast.compress.quantize import _name_each_call
from exml_fast.models import LeNet5, LeNet5BN, build_model, mobilenet_v2, resnet18_cifar_slim
from exml_fast.synth import DeepInversion

SHAPE = (1, 32, 32)
torchao = pytest.importorskip("torchao", reason="torchao not installed: pip install exml_fast[compress]")
needs_mnist = pytest.mark.skipif(data.find_data_root("mnist") is None,
                                 reason="MNIST files not found (set EXML_FAST_DATA)")


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return calibrated_bn(LeNet5BN(num_classes=10), SHAPE)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_synthetic_images_of_every_method_have_the_input_shape_and_repeat_with_the_seed(lenet, method):
    a = _quiet(synthetic_images, lenet, SHAPE, mean=0.13, std=0.31, method=method, n=6, iterations=2,
               progress=False)
    b = _quiet(synthetic_images, lenet, SHAPE, mean=0.13, std=0.31, method=method, n=6, iterations=2,
               progress=False)
    assert a.shape == (6, *SHAPE) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_zeroq_moves_noise_towards_the_bn_statistics(lenet):
    from exml_fast.synth.matcher import BNStatsMatcher

    def bn_loss(x):
        with torch.no_grad(), BNStatsMatcher(lenet, form="sq_std") as bn:
            lenet(x)
            return float(bn.loss())

    noise = synthetic_images(lenet, SHAPE, method="noise", n=32, progress=False)
    zeroq = synthetic_images(lenet, SHAPE, method="zeroq", n=32, iterations=30, progress=False)
    assert bn_loss(zeroq) < 0.5 * bn_loss(noise)


def test_a_synthesizer_instance_and_options_reach_the_synthesizer(lenet):
    synth = DeepInversion(lenet, input_shape=SHAPE, iterations=2, batch_size=4, warn_below=None)
    assert synthetic_images(lenet, SHAPE, method=synth, n=4, progress=False).shape == (4, *SHAPE)
    x = synthetic_images(lenet, SHAPE, n=4, iterations=2, options={"preset": "digits", "warn_below": None},
                         progress=False)
    assert x.shape == (4, *SHAPE)
    with pytest.raises(ValueError, match="options are for the named synthesizers"):
        synthetic_images(lenet, SHAPE, method="noise", n=4, options={"preset": "digits"})


def test_bad_inputs_name_what_is_wrong(lenet):
    with pytest.raises(ValueError, match="no BatchNorm layer.*method='noise'"):
        synthetic_images(LeNet5(num_classes=10), SHAPE, method="deepinversion", n=2)
    with pytest.raises(ValueError, match="must be a classifier"):
        quantize_without_data(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), SHAPE, method="noise", n=2)
    with pytest.raises(ValueError, match="does not take inputs of input_shape"):
        quantize_without_data(lenet, (3, 32, 32), method="noise", n=2)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_without_data("model.pt", SHAPE)
    with pytest.raises(ValueError, match="method"):
        synthetic_images(lenet, SHAPE, method="gan", n=2)
    with pytest.raises(ValueError, match="flow"):
        quantize_without_data(lenet, SHAPE, method="noise", n=2, flow="eager")
    with pytest.raises(ValueError, match=r"images must be \(N, 1, 32, 32\)"):
        quantize_without_data(lenet, SHAPE, images=torch.zeros(4, 1, 28, 28))
    with pytest.raises(TypeError, match="float tensor"):
        quantize_without_data(lenet, SHAPE, images=torch.zeros(4, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="nothing to quantise"):
        quantize_without_data(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()), SHAPE, method="noise", n=2)


@pytest.mark.parametrize("flow", ["pt2e", "fx"])
@pytest.mark.parametrize("arch", ["lenet5_bn", "resnet18_slim", "mobilenet_v2"])
def test_quantized_models_of_both_flows_stay_close_to_the_float_model(arch, flow):
    torch.manual_seed(0)
    make = {"lenet5_bn": lambda: LeNet5BN(num_classes=10),
            "resnet18_slim": lambda: resnet18_cifar_slim(num_classes=10, in_channels=1),
            "mobilenet_v2": lambda: mobilenet_v2(num_classes=10, in_channels=1)}[arch]
    model = calibrated_bn(make(), SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, *SHAPE)
    result = quantize_without_data(model, SHAPE, method="noise", n=32, flow=flow, progress=False)
    assert result.flow == flow and result.method == "noise" and result.n == 32 and result.fallback is None
    assert result.float_layers == ()  # every convolution and linear layer is int8
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    assert out.shape == ref.shape
    # int8 logits within a few per cent of the float ones, on inputs like the calibration's
    assert (out - ref).norm() < 0.1 * ref.norm()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched


def test_pt2e_goes_through_a_module_called_twice_and_drops_the_replaced_float_weights():
    torch.manual_seed(0)
    model = calibrated_bn(resnet18_cifar_slim(num_classes=10, in_channels=1), SHAPE)
    gm = torch.export.export(model, (torch.randn(2, *SHAPE),)).module()
    _name_each_call(gm)
    names = [next(reversed(n.meta["nn_module_stack"].values()))[0] for n in gm.graph.nodes
             if n.op == "call_function" and n.meta.get("nn_module_stack")]
    assert "layer1.0.relu#0" in names and "layer1.0.relu#1" in names
    result = quantize_without_data(model, SHAPE, method="noise", n=8, flow="pt2e", progress=False)
    int8 = [t for t in result.model.state_dict().values() if t.dtype == torch.int8]
    floats = sum(t.numel() for t in result.model.state_dict().values() if t.dtype == torch.float32)
    assert len(int8) == 21  # 20 convolutions (BN folded) + the classifier
    assert floats < 0.05 * sum(p.numel() for p in model.parameters())


class _PartlyQuantisable(nn.Module):
    """A convolution and a classifier the x86 quantizer takes, and two layers it leaves in float under PT2E: a
    transposed convolution, and a convolution by a computed weight (no module calls it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 3)
        self.gain = nn.Parameter(torch.ones(4, 1, 1, 1))
        self.mix = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.up(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.relu(torch.nn.functional.conv2d(h, self.mix.weight * self.gain)).mean((2, 3)))


def test_layers_pt2e_leaves_in_float_are_named_in_a_warning_and_the_result():
    model = calibrated_bn(_PartlyQuantisable(), (1, 12, 12))
    with pytest.warns(RuntimeWarning, match=r"the pt2e flow left 2 layer\(s\) of _PartlyQuantisable in float: up, "
                                            r"conv2d_1 \(the x86 quantizer takes only"):
        result = quantize_without_data(model, (1, 12, 12), method="noise", n=8, flow="pt2e", progress=False)
    assert result.float_layers == ("up", "conv2d_1")  # by module, or by the op's node where no module called it


def test_float_layers_of_an_fx_graph_are_its_float_modules_and_ops():
    from exml_fast.compress.quantize import _float_layers

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.w = nn.Conv2d(1, 4, 3), nn.Parameter(torch.ones(3, 4))

        def forward(self, x):
            return torch.nn.functional.linear(self.conv(x).mean((2, 3)), self.w)

    # a traced float model: every convolution and linear layer is float, as module calls or as functional ops
    assert _float_layers(torch.fx.symbolic_trace(Functional()), "fx") == ("conv", "linear")
    assert _float_layers(torch.fx.symbolic_trace(LeNet5BN()), "fx") == (
        "features.0", "features.4", "features.9", "features.12", "classifier")


def test_auto_falls_back_to_fx_with_a_warning_when_pt2e_fails(lenet, monkeypatch):
    import exml_fast.compress.quantize as q

    def refuse(*args, **kwargs):
        raise RuntimeError("export refused")

    monkeypatch.setattr(q, "_pt2e", refuse)
    with pytest.warns(RuntimeWarning, match="PT2E failed.*export refused.*FX flow"):
        result = quantize_without_data(lenet, SHAPE, method="noise", n=8, progress=False)
    assert result.flow == "fx" and "export refused" in result.fallback
    with pytest.raises(RuntimeError, match="PT2E could not quantise LeNet5BN"):
        quantize_without_data(lenet, SHAPE, method="noise", n=8, flow="pt2e", progress=False)


def test_an_int8_program_round_trips_through_its_file(lenet, tmp_path):
    result = quantize_without_data(lenet, SHAPE, method="noise", n=8, progress=False)
    x = torch.randn(5, *SHAPE)
    save_exported(result.model, tmp_path / "q.pt2", x)
    loaded = load_exported(tmp_path / "q.pt2")
    loaded.eval()
    torch.testing.assert_close(loaded(x), result.model(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exported(tmp_path / "missing.pt2")


def test_distill_without_data_trains_the_student_towards_the_teacher(lenet):
    torch.manual_seed(1)
    student = build_model("lenet5_half", num_classes=10)
    x = torch.randn(64, *SHAPE)

    def kl():  # KL(teacher || student) on held-out noise: what the KD loss drives down
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(student(x).log_softmax(1), lenet(x).log_softmax(1),
                                                    log_target=True, reduction="batchmean"))

    before = kl()
    result = distill_without_data(lenet, student, SHAPE, mean=0.13, std=0.31, method="noise", n=256, epochs=8,
                                  progress=False, temperature=4.0)
    assert result.student is student and result.method == "noise" and result.n == 256
    assert kl() < 0.5 * before
    with pytest.raises(ValueError, match="student has 5 outputs but teacher has 10"):
        distill_without_data(lenet, build_model("lenet5_half", num_classes=5), SHAPE, method="noise", n=4)
    with pytest.raises(ValueError, match="student must be a classifier"):
        distill_without_data(lenet, nn.Conv2d(1, 2, 3), SHAPE, method="noise", n=4)


@needs_mnist
def test_compress_quantize_job_writes_the_model_a_report_and_resumes(tmp_path):
    from exml_fast.cli import main

    teacher = str(tmp_path / "t.pt")
    assert main(["train-teacher", "--dataset", "mnist", "--arch", "lenet5bn", "--limit", "2000", "--out", teacher,
                 "--device", "cpu"]) == 0
    out = str(tmp_path / "q.pt2")
    args = ["compress", "quantize", "--model", teacher, "--out", out, "-n", "16", "--iterations", "3", "--test",
            "mnist", "--test-n", "500", "--no-latency", "--no-progress"]
    assert _quiet(main, args) == 0
    report = json.loads(open(out + ".report.json").read())
    assert report["flow"] == "pt2e" and report["n"] == 16 and report["size_after"] < report["size_before"]
    assert abs(report["accuracy_after"] - report["accuracy_before"]) < 0.05
    cached = [f for f in os.listdir(out + ".work") if f.endswith(".pt")]
    assert cached == ["images_deepinversion_n16_seed0_it3.pt"]
    stamp = os.path.getmtime(os.path.join(out + ".work", cached[0]))
    assert _quiet(main, args) == 0  # a rerun reads the images back
    assert os.path.getmtime(os.path.join(out + ".work", cached[0])) == stamp
    loaded = load_exported(out)
    assert loaded(torch.zeros(3, *SHAPE)).shape == (3, 10)
    student = str(tmp_path / "s.pt")
    assert _quiet(main, ["compress", "distill", "--model", teacher, "--out", student, "--student", "lenet5_half",
                         "-n", "32", "--iterations", "2", "--epochs", "1", "--no-latency", "--no-progress"]) == 0
    assert json.loads(open(student + ".report.json").read())["student"] == "lenet5_half"
    pruned = str(tmp_path / "p.pt2")
    assert _quiet(main, ["compress", "prune", "--model", teacher, "--out", pruned, "-n", "16", "--iterations", "2",
                         "--recover-epochs", "1", "--recover-steps", "2", "--feature-weight", "10", "--rotate", "15",
                         "--scale", "0.15", "--test", "mnist", "--test-n", "200", "--no-latency",
                         "--no-progress"]) == 0
    report = json.loads(open(pruned + ".report.json").read())
    assert (report["recover_epochs"], report["recover_steps"], report["feature_weight"]) == (1, 2, 10.0)
    assert (report["rotate"], report["scale"]) == (15.0, 0.15)
    assert report["macs_after"] <= 0.5 * report["macs_before"] and report["size_after"] < report["size_before"]
    assert load_exported(pruned)(torch.zeros(2, *SHAPE)).shape == (2, 10)
    assert main(["compress", "distill", "--model", teacher, "--out", student]) == 2  # --student is required
    assert main(["compress", "prune", "--model", teacher, "--out", pruned, "--feature-weight", "-1"]) == 2
    assert main(["compress", "prune", "--model", teacher, "--out", pruned, "--rotate", "181"]) == 2
    assert main(["compress", "prune", "--model", teacher, "--out", pruned, "--scale", "1"]) == 2
    assert main(["compress", "quantize", "--model", str(tmp_path / "none.pt"), "--out", out]) == 1
