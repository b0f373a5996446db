"""DeepInversion's presets ("auto" picked from the teacher, "cifar"/"cifar10", "imagenet", "digits"), ModelInversion's
automatic BN weight, and the low-agreement warning every inversion synthesizer gives after a batch."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _util import no_warnings
from torch import nn

from exml_fast.models import LeNet5BN, resnet18_cifar_slim
from exml_fast.synth import (DEEPINVERSION_PRESETS, DataImpressions, DeepInversion, LowAgreementWarning,
                             ModelInversion, load_synthetic)
from exml_fast.synth.presets import PRESET_NAMES, auto_bn_weight, bn_loss_of_noise

SHAPE = (3, 16, 16)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
OLD_DEFAULTS = {"lr": 0.05, "betas": [0.9, 0.999], "schedule": "constant", "warmup": 0.0, "bn_weight": 10.0,
                "first_bn_multiplier": 1.0, "flip": True}



# -- preset resolution ------------------------------------------------------------------------------------------


def test_auto_is_the_default_and_picks_the_bn_weight_from_the_teacher(bn_cnn):
    synth = DeepInversion(bn_cnn, input_shape=SHAPE, mean=MEAN, std=STD, num_classes=10)
    cfg = synth.config()
    assert cfg["preset"] == "auto" and synth.preset_name == "auto"
    noise, k = bn_loss_of_noise(bn_cnn, SHAPE, form="l2", first_bn_multiplier=1.0)
    assert k == 10 and noise > 0
    assert cfg["bn_weight"] == pytest.approx(math.log(10) / noise) == pytest.approx(auto_bn_weight(noise, 10))
    # Small inputs: the cifar optimiser and priors, without flips.
    assert not cfg["flip"] and cfg["lr"] == 0.05 and cfg["schedule"] == "constant" and cfg["betas"] == [0.9, 0.999]
    assert cfg["first_bn_multiplier"] == 1.0 and cfg["priors"]["tv_l2"] == 2.5e-5 and cfg["priors"]["l2"] == 0.0
    assert synth.iterations == 2000 and synth.batch_size == 256


def test_auto_weights_the_bn_term_by_its_size_on_the_teacher():
    """A deeper, wider BN network has a larger BN term of noise, so auto gives it a smaller weight."""
    torch.manual_seed(0)
    small = LeNet5BN(num_classes=10, in_channels=1).eval()
    deep = resnet18_cifar_slim(num_classes=10, in_channels=1).eval()
    w_small = DeepInversion(small, input_shape=(1, 32, 32)).bn_weight
    w_deep = DeepInversion(deep, input_shape=(1, 32, 32)).bn_weight
    assert 0 < w_deep < w_small / 5
    # The first-layer multiplier and the form are measured as they will be optimised.
    noise10, _ = bn_loss_of_noise(small, (1, 32, 32), first_bn_multiplier=10.0)
    assert DeepInversion(small, input_shape=(1, 32, 32), first_bn_multiplier=10.0).bn_weight == \
        pytest.approx(math.log(10) / noise10)


def test_auto_without_batchnorm_matches_nothing_and_says_nothing(lenet):
    with no_warnings():
        synth = DeepInversion(lenet, input_shape=(1, 32, 32), mean=0.5, std=0.25)
        mi = ModelInversion(lenet, input_shape=(1, 32, 32), mean=0.5, std=0.25)
    assert synth.bn_weight == 0.0 and mi.bn_weight == 0.0 and "bn" not in synth.term_names()
    # An explicit BN weight on a BN-free teacher still warns that it is ignored.
    with pytest.warns(UserWarning, match="no BatchNorm"):
        DeepInversion(lenet, input_shape=(1, 32, 32), bn_weight=1.0)


def test_auto_on_large_inputs_takes_the_imagenet_recipe_without_flips(bn_cnn):
    cfg = DeepInversion(bn_cnn, input_shape=(3, 128, 128), num_classes=10).config()
    assert cfg["betas"] == [0.5, 0.9] and cfg["schedule"] == "cosine" and cfg["warmup"] == 0.05
    assert cfg["lr"] == 0.25 and cfg["first_bn_multiplier"] == 10.0 and cfg["priors"]["tv_l2"] == 1e-4
    assert not cfg["flip"] and cfg["multi_resolution"] is None and cfg["jitter"] == round(30 * 128 / 224)


def test_explicit_arguments_win_over_every_preset(bn_cnn):
    for name in PRESET_NAMES:
        synth = DeepInversion(bn_cnn, input_shape=SHAPE, mean=MEAN, std=STD, num_classes=10, preset=name,
                              lr=0.123, bn_weight=0.7, flip=name == "auto", jitter=1, iterations=7, batch_size=5,
                              multi_resolution=None)
        cfg = synth.config()
        assert cfg["lr"] == 0.123 and cfg["bn_weight"] == 0.7 and cfg["flip"] == (name == "auto"), name
        assert cfg["jitter"] == 1 and synth.iterations == 7 and synth.batch_size == 5, name
        assert cfg["input_shape"] == list(SHAPE) and synth.mean == MEAN, name
        assert cfg["preset"] == ("cifar" if name == "cifar10" else name)


def test_cifar_is_the_old_default_and_cifar10_its_alias(bn_cnn):
    cfg = DeepInversion(bn_cnn, input_shape=SHAPE, num_classes=10, preset="cifar").config()
    assert {k: cfg[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert cfg["priors"]["tv_l2"] == 2.5e-5 and cfg["priors"]["l2"] == 0.0 and cfg["preset"] == "cifar"
    assert DEEPINVERSION_PRESETS["cifar10"] is DEEPINVERSION_PRESETS["cifar"]
    assert DeepInversion(bn_cnn, input_shape=SHAPE, num_classes=10, preset="cifar10").config() == cfg
    assert DeepInversion.preset("cifar10", bn_cnn, input_shape=SHAPE, num_classes=10).config() == cfg
    # The old way of asking for it: every key of the preset passed explicitly.
    explicit = DeepInversion(bn_cnn, input_shape=SHAPE, num_classes=10, **DEEPINVERSION_PRESETS["cifar10"])
    assert {k: v for k, v in explicit.config().items() if k != "preset"} == \
        {k: v for k, v in cfg.items() if k != "preset"}


def test_digits_preset(bn_cnn):
    cfg = DeepInversion(bn_cnn, input_shape=SHAPE, num_classes=10, preset="digits").config()
    assert cfg["bn_weight"] == 1.0 and cfg["first_bn_multiplier"] == 10.0 and cfg["lr"] == 0.1
    assert cfg["priors"]["tv_l2"] == 0.05 and cfg["priors"]["l2_sq"] == 1e-3 and cfg["jitter"] == 2
    assert not cfg["flip"] and cfg["preset"] == "digits"


def test_unknown_preset_names_the_argument_and_the_choices(bn_cnn):
    choices = "auto, cifar, cifar10, imagenet, digits"
    with pytest.raises(ValueError, match=rf"DeepInversion: preset must be one of {choices}; got 'mnist'"):
        DeepInversion(bn_cnn, input_shape=SHAPE, preset="mnist")
    with pytest.raises(ValueError, match=rf"DeepInversion.preset: name must be one of {choices}; got 'mnist'"):
        DeepInversion.preset("mnist", bn_cnn, input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"DeepInversion: input_shape is required"):
        DeepInversion(bn_cnn)
    with pytest.raises(ValueError, match=r"DeepInversion: input_shape must be \(C, H, W\)"):
        DeepInversion(bn_cnn, input_shape=(16, 16))
    # The imagenet preset carries its own input shape.
    assert DeepInversion(bn_cnn, preset="imagenet", num_classes=10).input_shape == (3, 224, 224)


def test_config_records_the_preset_in_the_manifest(bn_cnn, tmp_path):
    import json

    synth = DeepInversion(bn_cnn, input_shape=SHAPE, mean=MEAN, std=STD, num_classes=10, preset="digits",
                          iterations=2, batch_size=4, warn_below=None)
    synth.synthesize(4, generator=0, progress=False, save_to=tmp_path / "job")
    with open(tmp_path / "job" / "manifest.json") as f:
        job = json.load(f)["job"]
    assert job["config"]["preset"] == "digits" and job["config"]["bn_weight"] == 1.0
    assert len(load_synthetic(tmp_path / "job")) == 4


def test_model_inversion_bn_weight_auto(bn_cnn):
    mi = ModelInversion(bn_cnn, input_shape=SHAPE, num_classes=10)
    noise, _ = bn_loss_of_noise(bn_cnn, SHAPE, form="sq_std")
    assert mi.bn_weight == pytest.approx(math.log(10) / noise) and mi.config()["bn_weight_auto"]
    fixed = ModelInversion(bn_cnn, input_shape=SHAPE, num_classes=10, bn_weight=1.0)
    assert fixed.bn_weight == 1.0 and not fixed.config()["bn_weight_auto"]
    with pytest.raises(ValueError, match=r"ModelInversion: bn_weight must be a number >= 0 or 'auto'; got 'big'"):
        ModelInversion(bn_cnn, input_shape=SHAPE, bn_weight="big")


# -- the low-agreement warning ----------------------------------------------------------------------------------


def _low(cls, teacher, shape=SHAPE, **kw):
    """Two steps from noise on an untrained teacher: the teacher agrees with few targets."""
    kw.setdefault("num_classes", 10)
    return cls(teacher, input_shape=shape, mean=MEAN[: shape[0]], std=STD[: shape[0]], iterations=2,
               batch_size=8, **kw)


def _caught(synth, n=16, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = synth.synthesize(n, generator=0, progress=False, **kw)
    return batch, [w for w in caught if issubclass(w.category, LowAgreementWarning)]


def test_warning_fires_once_with_the_numbers_and_the_dominant_term(bn_cnn):
    synth = _low(DeepInversion, bn_cnn, preset="cifar", bn_weight=1000.0)
    batch, caught = _caught(synth)  # two batches, both below 0.9: one warning
    assert len(caught) == 1 and issubclass(LowAgreementWarning, UserWarning)
    msg = str(caught[0].message)
    agreement = float(batch.losses["teacher_acc"][0])
    assert agreement < 0.9 and f"labels only {agreement:.0%} of a batch as its target class" in msg
    assert "warn_below=0.9" in msg
    first = {k: v[:1] for k, v in batch.losses.items()}
    weighted = synth.weighted_terms(first)
    assert set(weighted) == {"main", "bn", "tv_l2"} and weighted["bn"] == pytest.approx(1000 * float(first["bn"][0]))
    for k, v in weighted.items():
        assert f"{k} {v:.4g}" in msg
    share = weighted["bn"] / sum(weighted.values())
    assert f"the BN term is {share:.0%} of the loss: lower bn_weight (now 1000) or use preset='auto'" in msg
    assert "flip=True" in msg  # the cifar preset flips: the hint says what that does to digits
    # Once per synthesizer: a second job of the same one is silent, a new synthesizer warns again.
    assert _caught(synth)[1] == []
    assert len(_caught(_low(DeepInversion, bn_cnn, preset="cifar"))[1]) == 1


def test_warning_hint_names_the_main_term_and_priors(bn_cnn, lenet):
    msg = str(_caught(_low(DeepInversion, lenet, shape=(1, 32, 32)))[1][0].message)
    assert "the main (cross-entropy) term is" in msg and "more iterations or a larger lr" in msg
    assert "flip=True" not in msg and "bn " not in msg
    msg = str(_caught(_low(DeepInversion, lenet, shape=(1, 32, 32), tv_l2_weight=10.0))[1][0].message)
    assert "the tv_l2 term is" in msg and "lower tv_l2_weight" in msg


def test_warning_for_model_inversion_and_data_impressions(bn_cnn):
    msg = str(_caught(_low(ModelInversion, bn_cnn, bn_weight=1000.0))[1][0].message)
    assert msg.startswith("ModelInversion: the teacher labels only") and "lower bn_weight" in msg
    synth = _low(DataImpressions, bn_cnn, lr=1e-6)
    batch, caught = _caught(synth)
    with torch.no_grad():
        agree = (bn_cnn(batch.x[:8]).argmax(1) == batch.soft_targets[:8].argmax(1)).float().mean().item()
    if agree < 0.9:
        assert len(caught) == 1
        assert f"labels only {agree:.0%} of a batch as the argmax of its soft target" in str(caught[0].message)
    else:  # pragma: no cover - an untrained teacher that agrees with random targets
        assert caught == []


def test_no_warning_when_the_teacher_agrees_or_when_disabled(bn_cnn):
    torch.manual_seed(3)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()  # any target is easy to reach
    synth = DeepInversion(linear, input_shape=(1, 8, 8), lr=0.1, jitter=0, iterations=50, batch_size=10)
    with no_warnings():
        batch = synth.synthesize(10, generator=0, progress=False)
    assert float(batch.losses["teacher_acc"][0]) >= 0.9
    quiet = _low(DeepInversion, bn_cnn, preset="cifar", bn_weight=1000.0, warn_below=None)
    batch, caught = _caught(quiet)
    assert caught == [] and float(batch.losses["teacher_acc"][0]) < 0.9


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, True, "0.9"])
def test_warn_below_is_checked(bn_cnn, bad):
    with pytest.raises(ValueError, match=r"warn_below must be a fraction in \(0, 1\] or None"):
        DeepInversion(bn_cnn, input_shape=SHAPE, num_classes=10, warn_below=bad)


def test_warning_threshold_is_exact(bn_cnn):
    """18 of 20 agreeing meets warn_below=0.9, although the float32 mean the step records is 0.89999998."""
    from exml_fast.synth import SyntheticBatch

    synth = DeepInversion(bn_cnn, input_shape=SHAPE, num_classes=10, preset="cifar")
    x, y = torch.zeros(20, *SHAPE), torch.zeros(20, dtype=torch.int64)

    def batch(hits):
        acc = (torch.arange(20) < hits).float().mean().reshape(1)
        losses = {"total": torch.ones(1), "main": torch.ones(1), "bn": torch.ones(1), "tv_l2": torch.ones(1),
                  "teacher_acc": acc}
        return SyntheticBatch(x, y, None, losses, MEAN, STD)

    assert float(batch(18).losses["teacher_acc"][0]) < 0.9  # the float32 mean
    with no_warnings():
        synth._check_agreement(batch(18))
    with pytest.warns(LowAgreementWarning, match="labels only 85% of a batch"):
        synth._check_agreement(batch(17))
