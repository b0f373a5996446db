"""ResNets for 32x32 inputs (CIFAR style: 3x3 stem, stride 1, no max-pool).

- :func:`resnet18_cifar`, :func:`resnet34_cifar`: four stages (64/128/256/512 channels at width 64).
- :func:`resnet32`: He et al.'s CIFAR ResNet-32, three stages of five BasicBlocks (16/32/64 channels).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet18_cifar", "resnet18_cifar_slim", "resnet32", "resnet34_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut.

    (N, in_planes, H, W) → (N, planes, H/stride, W/stride). When the shape
    changes (stride ≠ 1 or in_planes ≠ planes) the shortcut is a 1x1 conv with
    that stride followed by BN.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet with BasicBlocks for (N, in_channels, 32, 32) inputs.

    Stem: conv3x3(in_channels→width), BN, ReLU at full resolution. Then one
    stage per entry of ``blocks`` (``layer1``, ``layer2``, ...): ``blocks[i]``
    BasicBlocks with ``width · 2^i`` channels; every stage after the first
    halves the resolution (four stages: 32 → 16 → 8 → 4 for a 32x32 input).
    Then global average pooling to (N, width · 2^(S-1)) for S stages and
    ``classifier`` = Linear(width · 2^(S-1) → num_classes). Any input side ≥ 8
    works thanks to the adaptive pooling.

    Attributes:
        classifier: the last ``nn.Linear``.
        num_features: the pooled feature size, width · 2^(S-1).
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        *,
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if len(blocks) < 1 or any(n < 1 for n in blocks):
            raise ValueError(f"blocks must be one or more ints >= 1 (BasicBlocks per stage); got {blocks!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.num_stages = len(blocks)
        in_planes = width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(in_planes, planes, stride)]
            layers += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
            # Named layer1, layer2, ... (the state_dict keys of the four-stage nets are unchanged).
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            in_planes = planes
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) → pooled features (N, num_features)."""
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) → logits (N, num_classes)."""
        return self.classifier(self.forward_features(x))


def resnet18_cifar(num_classes: int = 10, *, width: int = 64, in_channels: int = 3) -> ResNetCIFAR:
    """CIFAR ResNet-18: blocks (2, 2, 2, 2), 20 BatchNorm2d layers, ~11.2M params at width 64."""
    return ResNetCIFAR((2, 2, 2, 2), num_classes=num_classes, width=width, in_channels=in_channels)


def resnet34_cifar(num_classes: int = 10, *, width: int = 64, in_channels: int = 3) -> ResNetCIFAR:
    """CIFAR ResNet-34: blocks (3, 4, 6, 3), 36 BatchNorm2d layers, ~21.3M params at width 64."""
    return ResNetCIFAR((3, 4, 6, 3), num_classes=num_classes, width=width, in_channels=in_channels)


def resnet18_cifar_slim(num_classes: int = 10, *, width: int = 20, in_channels: int = 3) -> ResNetCIFAR:
    """The slim CIFAR ResNet-18 ("nf=20" in continual-learning code): :func:`resnet18_cifar` at width 20,
    ~1.1M params."""
    return resnet18_cifar(num_classes, width=width, in_channels=in_channels)


def resnet32(num_classes: int = 10, *, width: int = 16, in_channels: int = 3) -> ResNetCIFAR:
    """He et al.'s CIFAR ResNet-32: a 3x3 stem, three stages of five BasicBlocks with 16/32/64 channels
    (at width 16), global pooling, Linear(64 → num_classes); 33 BatchNorm2d layers (31 + 2 in shortcuts).

    Shortcuts where the shape changes are 1x1 conv + BN (the paper's option B), not option A's
    zero-padded identity: ~0.47M params instead of 0.46M.
    """
    return ResNetCIFAR((5, 5, 5), num_classes=num_classes, width=width, in_channels=in_channels)
