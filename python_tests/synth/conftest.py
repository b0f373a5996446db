"""Fixtures the synthesizer tests share: a tiny calibrated BN CNN and a BN-less LeNet-5."""

import pytest
import torch
from _util import calibrated_bn

from exml_fast.models import LeNet5, resnet18_cifar

#: the input shape of ``bn_cnn``
SHAPE_BN = (3, 16, 16)


@pytest.fixture(scope="module")
def bn_cnn():
    """A width-4 CIFAR ResNet-18 with running statistics of random (3, 16, 16) inputs, in eval mode."""
    torch.manual_seed(0)
    return calibrated_bn(resnet18_cifar(num_classes=10, width=4), SHAPE_BN)


@pytest.fixture(scope="module")
def lenet():
    """A random-init LeNet-5 (no BatchNorm), in eval mode."""
    torch.manual_seed(1)
    return LeNet5(num_classes=10).eval()
