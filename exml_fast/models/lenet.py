"""LeNet-5 variants for 32x32 single-channel inputs (MNIST padded to 32)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5", "LeNet5BN", "LeNet5Half"]


class LeNet5BN(nn.Module):
    """LeNet-5 with batch normalisation after every hidden layer.

    Layers (shapes for a (N, C, 32, 32) input)::

        conv5x5(C→6)   → BN2d → ReLU → MaxPool2    (N, 6, 14, 14)
        conv5x5(6→16)  → BN2d → ReLU → MaxPool2    (N, 16, 5, 5)
        flatten                                     (N, 400)
        Linear(400→120) → BN1d → ReLU               (N, 120)
        Linear(120→84)  → BN1d → ReLU               (N, 84)
        classifier: Linear(84→num_classes)          (N, num_classes)

    The layers followed by BN have no bias (BN's shift makes it redundant).
    Its four BN layers carry the running statistics that BN-statistic
    matching (DeepInversion's feature prior) uses.

    Attributes:
        features: everything up to the 84-dim penultimate activations.
        classifier: the last ``nn.Linear``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120, bias=False),
            nn.BatchNorm1d(120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84, bias=False),
            nn.BatchNorm1d(84),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, 32, 32) → logits (N, num_classes)."""
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 as in the Ex-Model CL reference code: Tanh, AvgPool, no BN.

    Layers (shapes for a (N, C, 32, 32) input)::

        conv5x5(C→6)   → Tanh → AvgPool2    (N, 6, 14, 14)
        conv5x5(6→16)  → Tanh → AvgPool2    (N, 16, 5, 5)
        flatten                              (N, 400)
        Linear(400→120) → Tanh               (N, 120)
        Linear(120→84)  → Tanh               (N, 84)
        classifier: Linear(84→num_classes)   (N, num_classes)

    Attributes:
        features: everything up to the 84-dim penultimate activations.
        classifier: the last ``nn.Linear``.
    """

    #: (conv1, conv2, fc1, fc2) widths.
    widths: tuple[int, int, int, int] = (6, 16, 120, 84)

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        c1, c2, f1, f2 = self.widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 5 * 5, f1),
            nn.Tanh(),
            nn.Linear(f1, f2),
            nn.Tanh(),
        )
        self.classifier = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, 32, 32) → logits (N, num_classes)."""
        return self.classifier(self.features(x))


class LeNet5Half(LeNet5):
    """LeNet-5-Half, the Data Impressions paper's student: :class:`LeNet5` with
    half the filters and units in every hidden layer (conv 3 and 8 channels,
    linear 60 and 42 units)."""

    widths = (3, 8, 60, 42)
