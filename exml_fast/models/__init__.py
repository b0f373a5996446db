"""Model definitions used as experts (teachers) and students.

- :class:`LeNet5BN` — LeNet-5 with BatchNorm, (N, C, 32, 32) → (N, classes).
- :class:`LeNet5` — the Ex-Model CL reference LeNet-5 (Tanh, AvgPool, no BN).
- :func:`resnet18_cifar`, :func:`resnet34_cifar` — CIFAR ResNets,
  (N, 3, 32, 32) → (N, classes).
"""

from .lenet import LeNet5, LeNet5BN
from .resnet_cifar import BasicBlock, ResNetCIFAR, resnet18_cifar, resnet34_cifar

__all__ = ["LeNet5", "LeNet5BN", "BasicBlock", "ResNetCIFAR", "resnet18_cifar", "resnet34_cifar"]
