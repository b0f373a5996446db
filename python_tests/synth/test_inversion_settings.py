"""exml_fast.synth.InversionSettings: the inversion synthesizers' settings as one dataclass, and today's keyword
calls unchanged.

``data/inversion_keywords.json`` records what nine keyword calls built (config, every setting attribute and the
loss terms) before the settings became a dataclass; the same calls must still build exactly that, and so must
the same settings passed as an InversionSettings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import warnings

import pytest
import torch
from _util import calibrated_bn

from exml_fast.models import LeNet5, resnet18_cifar
from exml_fast.synth import DataImpressions, DeepInversion, InversionSettings, ModelInversion
from exml_fast.synth.inversion_settings import ENGINE_DEFAULTS, FIELDS, UNSET

GOLDEN = pathlib.Path(__file__).parent / "data" / "inversion_keywords.json"
KINDS = {"MI": ModelInversion, "DI": DeepInversion, "DIMP": DataImpressions}
#: name -> (synthesizer, teacher, keywords): the calls recorded in GOLDEN.
CASES = {
    "mi_defaults": ("MI", "bn", dict(input_shape=(3, 16, 16), mean=0.5, std=0.25)),
    "mi_lenet_keywords": ("MI", "lenet", dict(input_shape=(1, 32, 32), mean=0.1307, std=0.3081, temperature=3.0,
                                           lr=0.02, bn_weight=0.0, blur_weight=0.0, l2_sq_weight=1e-2, jitter=1,
                                           pad_crop=2, augment_per="batch", keep_best=False, log_every=5)),
    "di_auto": ("DI", "bn", dict(input_shape=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))),
    "di_cifar_overrides": ("DI", "bn", dict(input_shape=(3, 16, 16), preset="cifar", lr=0.1, tv_l1_weight=1e-4,
                                         betas=(0.5, 0.9), adam_eps=1e-6, warmup=0.1, schedule="cosine",
                                         first_bn_multiplier=10.0, bn_form="mse", init_std=0.5,
                                         stop_when="converged", stop_patience=3, stop_tol=0.02,
                                         warn_below=None, precision="bf16", channels_last=True,
                                         multi_resolution=(0.5, 0.5), blur_weight=1e-3, blur_kernel_size=7,
                                         blur_sigma=1.0, blur_per_sample_norm=True)),
    "di_digits_lenet": ("DI", "lenet", dict(input_shape=(1, 32, 32), preset="digits", mean=0.1307, std=0.3081)),
    "di_imagenet": ("DI", "bn", dict(preset="imagenet", iterations=4, batch_size=2)),
    "adi": ("DI", "bn", dict(input_shape=(3, 16, 16), competitor="student", competition_temperature=2.0,
                          competition_clamp=(0.05, 0.95), competition_form="public")),
    "dimp_defaults": ("DIMP", "lenet", dict(input_shape=(1, 32, 32), mean=0.1307, std=0.3081)),
    "dimp_keywords": ("DIMP", "bn", dict(input_shape=(3, 16, 16), beta=10.0, temperature=5.0, bn_weight=1.0,
                                      flip=True, stop_when="converged", stop_agreement=0.9, clip=False)),
}
ATTRS = ("lr", "betas", "adam_eps", "schedule", "warmup", "temperature", "bn_weight", "first_bn_multiplier",
         "bn_form", "prior_weights", "blur_kernel_size", "blur_sigma", "blur_per_sample_norm", "jitter", "flip",
         "pad_crop", "augment_per", "clip", "keep_best", "init_std", "competition_weight",
         "competition_temperature", "competition_clamp", "competition_form", "precision", "channels_last",
         "cuda_graph", "compile", "multi_resolution", "log_every", "stop_when", "stop_agreement", "stop_patience",
         "stop_tol", "warn_below", "iterations", "batch_size")


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    bn = calibrated_bn(resnet18_cifar(num_classes=10, width=4), (3, 16, 16))
    torch.manual_seed(1)
    return {"bn": bn, "lenet": LeNet5(num_classes=10).eval()}


def _build(kind, teacher, kw, *, as_settings: bool):
    kw = dict(kw)
    if kw.get("competitor") == "student":
        kw["competitor"] = resnet18_cifar(num_classes=10, width=2).eval()
    if as_settings:  # every engine setting through the dataclass, the rest as keywords
        settings = InversionSettings(**{k: v for k, v in kw.items() if k in FIELDS})
        kw = {k: v for k, v in kw.items() if k not in FIELDS}
        kw["settings"] = settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KINDS[kind](teacher, **kw)


def _record(synth) -> dict:
    attrs = json.loads(json.dumps({a: getattr(synth, a) for a in ATTRS}, default=list))
    return {"config": json.loads(json.dumps(synth.config())), "attrs": attrs, "terms": synth.term_names()}


def _assert_same(got, want, where=""):
    """Equal, floats to 1e-6 relative (the auto BN weight comes from a forward pass)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12), where
    else:
        assert got == want and type(got) is type(want), where


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("as_settings", [False, True], ids=["keywords", "settings"])
def test_keyword_calls_build_what_they_always_built(name, as_settings, teachers):
    golden = json.loads(GOLDEN.read_text())
    kind, teacher, kw = CASES[name]
    _assert_same(_record(_build(kind, teachers[teacher], kw, as_settings=as_settings)), golden[name], name)


def test_settings_and_keywords_synthesise_the_same_images(teachers):
    kw = dict(input_shape=(1, 32, 32), mean=0.1307, std=0.3081, iterations=3, batch_size=4, lr=0.05, jitter=1)
    a = ModelInversion(teachers["lenet"], **kw).synthesize(4, generator=3)
    settings = InversionSettings(iterations=3, batch_size=4, lr=0.05, jitter=1)
    b = ModelInversion(teachers["lenet"], input_shape=(1, 32, 32), mean=0.1307, std=0.3081,
                       settings=settings).synthesize(4, generator=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_keywords_win_over_settings_which_win_over_defaults(teachers):
    settings = InversionSettings(lr=0.2, temperature=4.0, flip=True)
    mi = ModelInversion(teachers["lenet"], input_shape=(1, 32, 32), settings=settings, lr=0.03)
    assert (mi.lr, mi.temperature, mi.flip) == (0.03, 4.0, True)
    assert mi.schedule == "constant" and mi.iterations == 3000  # unset fields keep ModelInversion's defaults
    di = DeepInversion(teachers["bn"], input_shape=(3, 16, 16), preset="cifar", settings=settings)
    assert (di.lr, di.temperature, di.flip, di.iterations) == (0.2, 4.0, True, 2000)  # the rest is the preset's
    dimp = DataImpressions(teachers["lenet"], input_shape=(1, 32, 32), settings=InversionSettings(iterations=7))
    assert (dimp.iterations, dimp.temperature) == (7, 20.0)


def test_competitor_through_settings(teachers):
    student = resnet18_cifar(num_classes=10, width=2).eval()
    adi = DeepInversion(teachers["bn"], input_shape=(3, 16, 16), settings=InversionSettings(competitor=student))
    assert adi.competitor is student and adi.competition_weight == 10.0  # the paper's α_c, as with the keyword
    other = resnet18_cifar(num_classes=10, width=2).eval()
    adi = DeepInversion(teachers["bn"], input_shape=(3, 16, 16), competitor=other,
                        settings=InversionSettings(competitor=student, competition_weight=2.0))
    assert adi.competitor is other and adi.competition_weight == 2.0


def test_the_dataclass(teachers):
    s = InversionSettings(lr=0.1, stop_when="converged")
    assert s.given() == {"lr": 0.1, "stop_when": "converged"} and s.iterations is UNSET
    assert repr(s) == "InversionSettings(lr=0.1, stop_when='converged')"
    assert dataclasses.replace(s, lr=0.2).given()["lr"] == 0.2
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 0.3
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        InversionSettings(learning_rate=0.1)
    assert set(FIELDS) == set(ENGINE_DEFAULTS) | {"iterations", "batch_size", "lr"}
    for f in dataclasses.fields(InversionSettings):
        assert f.default is UNSET, f.name


def test_errors_name_the_synthesizer_and_the_argument(teachers):
    lenet = teachers["lenet"]
    with pytest.raises(TypeError, match="ModelInversion: settings must be an InversionSettings or None; got dict"):
        ModelInversion(lenet, input_shape=(1, 32, 32), settings={"lr": 0.1})
    with pytest.raises(ValueError, match=r"DataImpressions: lr must be"):
        DataImpressions(lenet, input_shape=(1, 32, 32), settings=InversionSettings(lr=-1.0))
    with pytest.raises(ValueError, match=r"DeepInversion: jitter must be an int >= 0"):
        DeepInversion(lenet, input_shape=(1, 32, 32), settings=InversionSettings(jitter=-2))
    for kind in (ModelInversion, DeepInversion, DataImpressions):
        with pytest.raises(TypeError, match=rf"{kind.__name__}.__init__\(\) got an unexpected keyword argument "
                                            "'learning_rate'"):
            kind(lenet, input_shape=(1, 32, 32), learning_rate=0.1)
