"""Model definitions used as experts (teachers) and students.

- :class:`LeNet5BN` — LeNet-5 with BatchNorm, (N, C, 32, 32) → (N, classes).
- :class:`LeNet5` — the Ex-Model CL reference LeNet-5 (Tanh, AvgPool, no BN).
- :class:`LeNet5Half` — LeNet-5 with half the filters (Data Impressions' student).
- :func:`resnet18_cifar`, :func:`resnet34_cifar` — CIFAR ResNets,
  (N, 3, 32, 32) → (N, classes).
"""

from torch import nn

from .lenet import LeNet5, LeNet5BN, LeNet5Half
from .resnet_cifar import BasicBlock, ResNetCIFAR, resnet18_cifar, resnet34_cifar

#: Architectures by name, for checkpoints and the command line:
#: each is called as ``ARCHS[name](num_classes=..., in_channels=...)``.
ARCHS = {
    "lenet5": LeNet5,
    "lenet5bn": LeNet5BN,
    "lenet5half": LeNet5Half,
    "resnet18_cifar": resnet18_cifar,
    "resnet34_cifar": resnet34_cifar,
}


def build_model(arch: str, *, num_classes: int = 10, in_channels: int | None = None) -> nn.Module:
    """A fresh model of architecture ``arch`` (a key of :data:`ARCHS`)."""
    if arch not in ARCHS:
        raise ValueError(f"build_model: arch must be one of {sorted(ARCHS)}; got {arch!r}")
    kwargs = {"num_classes": num_classes}
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return ARCHS[arch](**kwargs)


__all__ = ["ARCHS", "LeNet5", "LeNet5BN", "LeNet5Half", "BasicBlock", "ResNetCIFAR", "build_model",
           "resnet18_cifar", "resnet34_cifar"]
