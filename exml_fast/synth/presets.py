"""Named settings of DeepInversion and the ``auto`` rule that picks them from the teacher.

:data:`DEEPINVERSION_PRESETS` holds the recipes of the papers and of this library ("cifar" with its older name
"cifar10", "imagenet", "digits"); :func:`resolve_deepinversion` turns a preset name, the teacher and the
arguments a user passed into the settings of one :class:`~exml_fast.synth.DeepInversion`. The ``auto`` rule
measures one thing on the teacher, the BatchNorm-statistic loss of a batch of noise
(:func:`bn_loss_of_noise`), and scales the BN weight by it (:func:`auto_bn_weight`); see
:class:`~exml_fast.synth.DeepInversion` for the rule and the measurements behind it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from exml_fast._utils.checks import check_choice
from exml_fast.reference.bn_stats import BN_LOSS_FORMS
from exml_fast.synth.base import check_input_shape, check_teacher, eval_mode, resolve_device
from exml_fast.synth.matcher import BNStatsMatcher

__all__ = ["AUTO_BN_RATIO", "DEEPINVERSION_PRESETS", "PRESET_ALIASES", "PRESET_NAMES", "auto_bn_weight",
           "bn_loss_of_noise", "has_batchnorm", "measured_bn_weight", "resolve_deepinversion"]

#: Named settings of :class:`~exml_fast.synth.DeepInversion` (keyword arguments), with their sources.
#: ``DeepInversion(teacher, preset=name, **overrides)`` (or ``DeepInversion.preset(name, teacher, **overrides)``)
#: builds one; arguments passed explicitly win over the preset's.
DEEPINVERSION_PRESETS: dict[str, dict[str, Any]] = {
    # The library's defaults before the "auto" preset. Paper §4.1 (Adam lr 0.05, batches of 256, 2k updates,
    # α_tv 2.5e-5, α_f in {1, 5, 10, 100}, α_c 10) as the public CIFAR-10 script runs it with its "paper
    # parameters" command (--r_feature_weight 10 --di_lr 0.05; its defaults: TV 2.5e-5, l2 0, constant lr,
    # Adam's default betas, no first-layer multiplier, jitter 2). The paper's text gives α_l2 3e-8 (about 3e-5
    # on the loss of a 256 x 3 x 32 x 32 batch of N(0, 1): negligible); the script's command uses 0. Flips: the
    # paper's Appendix B.1 flips, the CIFAR script does not; this preset flips (natural images are mirror
    # symmetric; digits and letters are not: see "digits").
    "cifar": {"lr": 0.05, "betas": (0.9, 0.999), "schedule": "constant", "warmup": 0.0, "iterations": 2000,
              "batch_size": 256, "bn_weight": 10.0, "first_bn_multiplier": 1.0, "tv_l2_weight": 2.5e-5,
              "l2_weight": 0.0, "flip": True},
    # The public ImageNet code (NVlabs/DeepInversion): the README's command (ResNet-50, --bs 84 --do_flip
    # --r_feature 0.01 --setting_id 0 --lr 0.25), imagenet_inversion.py's defaults (first_bn_multiplier 10,
    # tv_l2 1e-4, l2 1e-5, jitter 30) and deepinversion.py (Adam betas (0.5, 0.9), lr_cosine_policy with a
    # 100-step warm-up, restarted per resolution; setting 0: 2k steps at half resolution, then 1k at full).
    # The warm-up here is 5 % of each phase (100 of the first phase's 2000, 50 of the second's 1000). The
    # script's l2 is the mean per-image norm; ours (l2_weight) is the norm of the whole batch, about
    # sqrt(batch) times larger at equal weight. Images are clipped to the range of valid pixels under the
    # torchvision normalisation (paper Appendix D).
    "imagenet": {"input_shape": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                 "lr": 0.25, "betas": (0.5, 0.9), "schedule": "cosine", "warmup": 0.05, "iterations": 3000,
                 "multi_resolution": (0.5, 2 / 3), "batch_size": 84, "bn_weight": 0.01, "first_bn_multiplier": 10.0,
                 "tv_l2_weight": 1e-4, "l2_weight": 1e-5, "flip": True, "jitter": 30},
    # 32 x 32 grey-scale digits and clothes (MNIST, Fashion-MNIST): what `exml-fast synthesize` used for such
    # teachers before the presets (BN 1 with the first layer x10, a strong TV prior 0.05, ||x||² 1e-3 per image,
    # Adam lr 0.1 at a constant rate, jitter 2 px, no flips: a mirrored 2 is no digit). The demo
    # (exml_fast.experiments.demo_inversion) runs it with a cosine decay: 64/64 of its images are their class.
    "digits": {"lr": 0.1, "betas": (0.9, 0.999), "schedule": "constant", "warmup": 0.0, "iterations": 2000,
               "batch_size": 256, "bn_weight": 1.0, "first_bn_multiplier": 10.0, "tv_l2_weight": 0.05,
               "l2_weight": 0.0, "l2_sq_weight": 1e-3, "jitter": 2, "flip": False},
}
#: Older names of presets: ``"cifar10"`` is ``"cifar"``.
PRESET_ALIASES: dict[str, str] = {"cifar10": "cifar"}
DEEPINVERSION_PRESETS["cifar10"] = DEEPINVERSION_PRESETS["cifar"]  # the same dict: DEEPINVERSION_PRESETS["cifar10"]
#: What ``preset=`` accepts.
PRESET_NAMES: tuple[str, ...] = ("auto", "cifar", "cifar10", "imagenet", "digits")

#: ``auto``'s BN weight puts the BN term of a batch of noise at this multiple of ln K, the cross-entropy of
#: a uniform guess over K classes (see auto_bn_weight).
AUTO_BN_RATIO = 1.0
#: ``auto`` treats an input with a side of at least this many pixels as ImageNet-like.
AUTO_LARGE_SIDE = 128
# The settings of `auto` besides the BN weight: the "cifar" optimiser and priors without flips (small inputs),
# the "imagenet" recipe without flips and without multi-resolution (large inputs; the teacher may not take a
# half-size input).
_AUTO_SMALL = {"lr": 0.05, "betas": (0.9, 0.999), "schedule": "constant", "warmup": 0.0, "iterations": 2000,
               "batch_size": 256, "first_bn_multiplier": 1.0, "tv_l2_weight": 2.5e-5, "l2_weight": 0.0,
               "flip": False}
_AUTO_LARGE = {"lr": 0.25, "betas": (0.5, 0.9), "schedule": "cosine", "warmup": 0.05, "iterations": 2000,
               "batch_size": 84, "first_bn_multiplier": 10.0, "tv_l2_weight": 1e-4, "l2_weight": 1e-5, "flip": False}
# Noise images the BN loss is measured on (the size changes the measure little: the statistics are per channel).
_PROBE_BATCH = 16
_PROBE_SEED = 0


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics (what BN matching needs)."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
               for m in model.modules())


def bn_loss_of_noise(teacher: nn.Module, input_shape: Sequence[int], *, form: str = "l2",
                     first_bn_multiplier: float = 1.0, init_std: float = 1.0,
                     device: torch.device | str | None = None,
                     owner: str = "bn_loss_of_noise") -> tuple[float | None, int]:
    """The BatchNorm-statistic loss of a batch of noise, and the teacher's number of outputs.

    One eval-mode forward of 16 inputs ``N(0, init_std²)`` of shape ``input_shape`` (drawn on the CPU from a
    fixed seed: the same number on every device) with a :class:`~exml_fast.synth.BNStatsMatcher` of ``form``
    and ``first_bn_multiplier`` — the BN term at the start of a synthesis. Returns (the loss, or None when the
    teacher has no BatchNorm layer; K, the width of the teacher's output).

    Raises:
        ValueError: an unknown ``form`` (named ``bn_form``, the synthesizers' argument), an ``input_shape`` that
            is no (C, H, W) of positive sizes, or a teacher that fails on such an input or does not return (N, K)
            logits (the message names ``owner``).
        TypeError: an ``input_shape`` that is no sequence of ints.
    """
    check_choice(form, "bn_form", owner, BN_LOSS_FORMS)
    shape = check_input_shape(input_shape, owner)
    device = resolve_device(teacher, device, owner)
    g = torch.Generator().manual_seed(_PROBE_SEED)
    x = (torch.randn((_PROBE_BATCH, *shape), generator=g) * init_std).to(device)
    with eval_mode(teacher), torch.no_grad(), contextlib.ExitStack() as stack:
        bn = (stack.enter_context(BNStatsMatcher(teacher, form=form, first_bn_multiplier=first_bn_multiplier))
              if has_batchnorm(teacher) else None)
        try:
            out = teacher(x)
        except Exception as e:
            raise ValueError(f"{owner}: the teacher ({type(teacher).__name__}) failed on a batch of "
                             f"{shape} inputs: {e}") from e
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != _PROBE_BATCH:
            raise ValueError(f"{owner}: the teacher must map (N, C, H, W) inputs to (N, K) logits; got "
                             f"{getattr(out, 'shape', type(out).__name__)} for input_shape {shape}")
        loss = None if bn is None else float(bn.loss())
    return loss, int(out.shape[1])


def auto_bn_weight(bn_noise: float | None, num_classes: int, *, ratio: float = AUTO_BN_RATIO) -> float:
    """``ratio · ln K / bn_noise``: the weight at which the BN term of a batch of noise is ``ratio`` times the
    cross-entropy of a uniform guess over K classes (0 without BatchNorm, ``bn_noise`` None)."""
    if bn_noise is None or bn_noise <= 0:
        return 0.0
    return ratio * math.log(max(num_classes, 2)) / bn_noise


def measured_bn_weight(teacher: nn.Module, input_shape: Sequence[int], settings: Mapping[str, Any], *,
                       form: str, owner: str) -> tuple[float, int]:
    """The ``auto`` BN weight of ``teacher`` and its number of classes K.

    Measures :func:`bn_loss_of_noise` with the ``first_bn_multiplier``, ``init_std`` and ``device`` of
    ``settings`` (a synthesizer's keyword arguments; absent: 1, 1, the teacher's device), and returns
    (:func:`auto_bn_weight` of it, K): ``settings["num_classes"]`` when given, else the probe's output width.
    """
    check_teacher(teacher, owner)
    noise, k = bn_loss_of_noise(teacher, check_input_shape(input_shape, owner), form=form,
                                first_bn_multiplier=settings.get("first_bn_multiplier", 1.0),
                                init_std=settings.get("init_std", 1.0), device=settings.get("device"), owner=owner)
    k = settings.get("num_classes") or k
    return auto_bn_weight(noise, k), k


def resolve_deepinversion(preset: str, teacher: nn.Module, *, input_shape: Sequence[int] | None,
                          overrides: Mapping[str, Any], owner: str = "DeepInversion") -> tuple[str, dict[str, Any]]:
    """The canonical preset name and the keyword arguments of one DeepInversion.

    The preset's settings, then ``overrides`` (what the user passed) over them: an explicit argument always
    wins. ``auto`` picks its settings from ``input_shape`` (ImageNet-like from a side of 128 px) and measures
    the teacher for the BN weight (unless ``bn_weight`` is given).

    Raises:
        ValueError: an unknown preset (naming the argument and the choices), or ``auto`` without input_shape.
    """
    check_choice(preset, "preset", owner, PRESET_NAMES)
    check_teacher(teacher, owner)
    if input_shape is not None:
        input_shape = check_input_shape(input_shape, owner)
    name = PRESET_ALIASES.get(preset, preset)
    if name != "auto":
        settings = dict(DEEPINVERSION_PRESETS[name])
        if input_shape is not None:
            settings["input_shape"] = input_shape
        settings.update(overrides)
        return name, settings
    if input_shape is None:
        raise ValueError(f"{owner}: input_shape is required (preset 'auto' picks its settings from it); "
                         "pass input_shape=(C, H, W)")
    large = max(int(s) for s in tuple(input_shape)[1:]) >= AUTO_LARGE_SIDE
    settings = {**(_AUTO_LARGE if large else _AUTO_SMALL), "input_shape": input_shape}
    settings.update(overrides)
    if "bn_weight" not in overrides:
        settings["bn_weight"], k = measured_bn_weight(teacher, input_shape, settings,
                                                      form=settings.get("bn_form", "l2"), owner=owner)
        if settings.get("num_classes") is None:
            settings["num_classes"] = k  # the probe's forward found it: the synthesizer need not make another
    return name, settings
