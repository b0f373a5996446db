"""Model definitions used as experts (teachers) and students, and a registry of them by name.

- :class:`LeNet5` — the Ex-Model CL reference LeNet-5 (Tanh, AvgPool, no BN).
- :class:`LeNet5BN` — LeNet-5 with BatchNorm, (N, C, 32, 32) → (N, classes).
- :class:`LeNet5Half` — the ExML LeNet-5 with every layer halved (15 738 parameters).
- The data-free KD papers' networks (ReLU, max-pooling): :class:`LeNet5ZSKD` / :class:`LeNet5HalfZSKD`
  (Data Impressions: 61 706 / 35 820 parameters) and :class:`LeNet5DAFL` / :class:`LeNet5HalfDAFL`
  (DAFL, DFAD: 61 706 / 15 738).
- :func:`resnet18_cifar` (``width`` 64; :func:`resnet18_cifar_slim`: width 20),
  :func:`resnet34_cifar`, :func:`resnet32` — CIFAR ResNets, (N, 3, 32, 32) → (N, classes).
- :func:`mobilenet_v2` — torchvision's MobileNetV2 (needs torchvision).
- :class:`SKDGenerator` — SKD's knowledge delegator (generator networks, :data:`GENERATOR_ARCHS`).
- :class:`FeatureTap`, :func:`classifier_layer` — a classifier's penultimate features.

Every entry of :data:`ARCHS` is called as ``ARCHS[name](num_classes=K, in_channels=C, **kwargs)``;
:func:`register_arch` adds your own, :func:`build_model` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from exml_fast._utils.checks import check_choice
from .features import FeatureTap, classifier_layer
from .generators import GENERATOR_ARCHS, SKDGenerator, build_generator
from .lenet import LeNet5, LeNet5BN, LeNet5DAFL, LeNet5Half, LeNet5HalfDAFL, LeNet5HalfZSKD, LeNet5ZSKD
from .mobilenet import mobilenet_v2
from .resnet_cifar import BasicBlock, ResNetCIFAR, resnet18_cifar, resnet18_cifar_slim, resnet32, resnet34_cifar

#: Architectures by name, for checkpoints, expert streams and the command line: each is called as
#: ``ARCHS[name](num_classes=..., in_channels=..., **kwargs)``. ``lenet5bn`` / ``lenet5half`` are
#: the older names of ``lenet5_bn`` / ``lenet5_half`` (same factories, kept for old checkpoints).
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "lenet5_bn": LeNet5BN,
    "lenet5_half": LeNet5Half,
    "lenet5bn": LeNet5BN,
    "lenet5half": LeNet5Half,
    "lenet5_zskd": LeNet5ZSKD,
    "lenet5_half_zskd": LeNet5HalfZSKD,
    "lenet5_dafl": LeNet5DAFL,
    "lenet5_half_dafl": LeNet5HalfDAFL,
    "resnet18_cifar": resnet18_cifar,
    "resnet18_cifar_slim": resnet18_cifar_slim,
    "resnet34_cifar": resnet34_cifar,
    "resnet32": resnet32,
    "mobilenet_v2": mobilenet_v2,
}


def register_arch(name: str, factory: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Adds ``factory`` to :data:`ARCHS` under ``name``, so that checkpoints and expert streams can rebuild it.

    Args:
        name: a non-empty string; an existing name is an error unless ``overwrite``.
        factory: callable as ``factory(num_classes=K, in_channels=C, **kwargs)`` returning an
            ``nn.Module`` (a class or a function). It must build the same parameter names and
            shapes every time for the same arguments: loading rebuilds the model from it.
        overwrite: replace an existing entry (the built-in ones included).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_arch: name must be a non-empty string; got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_arch: factory must be callable as factory(num_classes=..., in_channels=...); "
                        f"got {type(factory).__name__}")
    if name in ARCHS and not overwrite:
        raise ValueError(f"register_arch: an architecture named {name!r} is already registered; pass "
                         "overwrite=True to replace it")
    ARCHS[name] = factory


def build_model(arch: str, *, num_classes: int = 10, in_channels: int | None = None, **kwargs) -> nn.Module:
    """A fresh model ``ARCHS[arch](num_classes=num_classes, in_channels=in_channels, **kwargs)``.

    ``in_channels=None`` leaves the architecture's default (1 for the LeNets, 3 for the others).
    Extra ``kwargs`` go to the factory (e.g. ``width=20`` for the CIFAR ResNets). The
    initialisation draws from torch's global generator: seed it (or fork it) around the call.
    """
    check_choice(arch, "arch", "build_model", ARCHS)
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return ARCHS[arch](num_classes=num_classes, **kwargs)


__all__ = ["ARCHS", "GENERATOR_ARCHS", "BasicBlock", "FeatureTap", "LeNet5", "LeNet5BN", "LeNet5DAFL", "LeNet5Half",
           "LeNet5HalfDAFL", "LeNet5HalfZSKD", "LeNet5ZSKD", "ResNetCIFAR",
           "SKDGenerator", "build_generator", "build_model", "classifier_layer", "mobilenet_v2", "register_arch",
           "resnet18_cifar", "resnet18_cifar_slim", "resnet32", "resnet34_cifar"]
