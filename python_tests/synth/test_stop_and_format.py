"""The engine's CPU memory format choice and early stopping (stop_when)."""

from __future__ import annotations

import pytest
import torch
from _util import calibrated_bn
from torch import nn

from exml_fast.models import LeNet5BN, resnet18_cifar
from exml_fast.synth import DeepInversion, ModelInversion
from exml_fast.synth.inversion import auto_channels_last

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return calibrated_bn(resnet18_cifar(num_classes=10, width=16), SHAPE, batches=3)


def test_auto_channels_last_follows_the_teacher(resnet):
    cpu = torch.device("cpu")
    assert auto_channels_last(resnet, cpu, "fp32")  # 16+ input channels: oneDNN's channels_last path
    assert auto_channels_last(resnet, cpu, "bf16")
    assert not auto_channels_last(resnet, cpu, "fp16")
    assert not auto_channels_last(LeNet5BN(), cpu, "fp32")  # LeNet-sized layers stay NCHW
    assert not auto_channels_last(resnet, torch.device("cuda", 0), "fp32")  # not measured there
    assert DeepInversion(resnet, input_shape=SHAPE, iterations=1).channels_last
    assert not DeepInversion(resnet, input_shape=SHAPE, iterations=1, channels_last=False).channels_last
    assert not DeepInversion(LeNet5BN(), input_shape=(1, 32, 32), iterations=1).channels_last


def test_channels_last_and_nchw_synthesise_the_same_batch(resnet):
    kw = dict(input_shape=SHAPE, mean=0.5, std=0.25, iterations=4, batch_size=8)
    a = DeepInversion(resnet, channels_last=True, **kw).synthesize(8, generator=1, progress=False)
    b = DeepInversion(resnet, channels_last=False, **kw).synthesize(8, generator=1, progress=False)
    torch.testing.assert_close(a.x, b.x, rtol=1e-3, atol=1e-3)
    assert all(p.is_contiguous() for p in resnet.parameters())  # weights put back
    assert not any("forward" in m.__dict__ for m in resnet.modules())


def test_without_stop_when_every_step_runs(resnet):
    synth = DeepInversion(resnet, input_shape=SHAPE, iterations=6, batch_size=4)
    synth.synthesize(8, generator=0, progress=False)
    assert synth.steps_run == [6, 6]
    assert "stop_when" not in synth.config()  # manifests of jobs without it are unchanged


def test_callable_stop_when_is_asked_at_each_refresh(resnet):
    calls = []

    def stop(step, terms):
        calls.append((step, set(terms)))
        return step >= 10

    synth = DeepInversion(resnet, input_shape=SHAPE, iterations=40, batch_size=4, log_every=5, stop_when=stop)
    batch = synth.synthesize(8, generator=0, progress=False)
    assert synth.steps_run == [10, 10]
    assert [s for s, _ in calls] == [5, 10, 5, 10]
    assert {"total", "main", "bn", "teacher_acc"} <= calls[0][1]
    assert batch.x.shape == (8, *SHAPE) and torch.isfinite(batch.x).all()
    assert synth.config()["stop_when"] == "callable"


def test_converged_stops_once_agreement_holds_and_the_loss_plateaus():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    # Pixels clipped to [0, 1] (mean/std given): the loss bottoms out, so it plateaus.
    synth = ModelInversion(teacher, input_shape=(3, 2, 2), mean=0.5, std=0.25, iterations=2000, batch_size=6,
                           lr=0.1, bn_weight=0.0,
                           blur_weight=0.0, l2_sq_weight=0.0, log_every=10, stop_when="converged",
                           stop_patience=50, stop_tol=1e-3, jitter=0)
    batch = synth.synthesize(6, generator=0, progress=False)
    assert 50 <= synth.steps_run[0] < 2000
    assert float(batch.losses["teacher_acc"][0]) >= 0.95
    cfg = synth.config()
    assert cfg["stop_when"] == "converged" and cfg["stop_patience"] == 50 and cfg["stop_tol"] == 1e-3


def test_stop_when_is_checked(resnet):
    with pytest.raises(ValueError, match="stop_when must be None, 'converged' or a callable"):
        DeepInversion(resnet, input_shape=SHAPE, stop_when="soon")
    with pytest.raises(ValueError, match="stop_agreement must be in"):
        DeepInversion(resnet, input_shape=SHAPE, stop_agreement=1.5)
    with pytest.raises(ValueError, match="stop_patience must be an int"):
        DeepInversion(resnet, input_shape=SHAPE, stop_patience=0)


# -- augment_per: one draw per sample (the default) or per batch (the public code's) --------------------------------


def test_augment_per_batch_draws_one_augmentation_for_the_whole_batch(monkeypatch):
    import exml_fast.synth.inversion as inv

    teacher = LeNet5BN(10, in_channels=1).eval()
    seen = []
    orig = inv.augment_with_params

    def spy(x, params, **kw):
        seen.append(params.clone())
        return orig(x, params, **kw)

    monkeypatch.setattr(inv, "augment_with_params", spy)
    for per, same in (("batch", True), ("sample", False)):
        seen.clear()
        synth = DeepInversion(teacher, input_shape=(1, 32, 32), augment_per=per, iterations=3, batch_size=6,
                              warn_below=None, flip=True, jitter=2)
        synth.synthesize(6, generator=0, progress=False)
        assert len(seen) == 3 and all(p.shape == (6, 5) for p in seen)
        assert all(bool((p == p[:1]).all()) for p in seen) == same, per
        # recorded in the config (and so in manifests) only when not the default
        assert synth.config().get("augment_per") == ("batch" if same else None)
    with pytest.raises(ValueError, match="augment_per must be one of sample, batch; got 'image'"):
        DeepInversion(teacher, input_shape=(1, 32, 32), augment_per="image")
