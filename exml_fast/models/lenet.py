"""LeNet-5 variants for 32x32 single-channel inputs (MNIST padded to 32)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5", "LeNet5BN", "LeNet5DAFL", "LeNet5Half", "LeNet5HalfDAFL", "LeNet5HalfZSKD", "LeNet5ZSKD"]


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


class _LeNet5Layers(nn.Module):
    """LeNet-5's layers (5×5 valid convolutions, 2×2 pooling, two dense layers, a linear classifier) with the
    subclass's ``widths`` (conv1, conv2, fc1, fc2), ``activation`` and ``pool``; ``conv_fc1`` makes the first
    dense layer a 5×5 convolution over the (conv2, 5, 5) map (DAFL/DFAD's ``conv5``: the function and the
    parameter count of a ``Linear(conv2·25 → fc1)``, the weight laid out as a convolution's)."""

    widths: tuple[int, int, int, int] = (6, 16, 120, 84)
    activation: type[nn.Module] = nn.Tanh
    pool: type[nn.Module] = nn.AvgPool2d
    conv_fc1: bool = False

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        c1, c2, f1, f2 = self.widths
        act = self.activation
        fc1: list[nn.Module] = ([nn.Conv2d(c2, f1, kernel_size=5), act(), nn.Flatten()] if self.conv_fc1 else
                                [nn.Flatten(), nn.Linear(c2 * 5 * 5, f1), act()])
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            act(),
            self.pool(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            act(),
            self.pool(2),
            *fc1,
            nn.Linear(f1, f2),
            act(),
        )
        self.classifier = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, 32, 32) → logits (N, num_classes)."""
        return self.classifier(self.features(x))


class LeNet5(_LeNet5Layers):
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


class LeNet5Half(LeNet5):
    """LeNet-5-Half, the Data Impressions paper's student: :class:`LeNet5` with
    half the filters and units in every hidden layer (conv 3 and 8 channels,
    linear 60 and 42 units)."""

    widths = (3, 8, 60, 42)


class _ReLULeNet5(_LeNet5Layers):
    """LeNet-5 with ReLU and 2×2 max-pooling, the data-free KD papers' form (see the subclasses)."""

    activation = nn.ReLU
    pool = nn.MaxPool2d


class LeNet5ZSKD(_ReLULeNet5):
    """The zero-shot KD paper's teacher (Nayak et al., Data Impressions §4.1.2.1): LeNet-5 with conv 6, 16 and
    dense 120, 84, 10 units — **61 706 parameters** for one input channel and 10 classes, as published.

    The paper gives the widths and the count ("similar to [9]"); the layers are those of [9]'s public code
    (Lopes et al.'s ``lenet5.py`` / ``lenet5_half.py``: ReLU, 2×2 max-pooling, 5×5 valid convolutions, which
    give exactly these counts). Its inputs are 32×32 pixels in [0, 1] (no mean/std normalisation).
    """


class LeNet5HalfZSKD(_ReLULeNet5):
    """The zero-shot KD paper's student: :class:`LeNet5ZSKD` with half the filters in each *convolution*
    (3, 8) and the dense layers kept (120, 84) — **35 820 parameters**, as published. (DAFL/DFAD's
    LeNet-5-Half, :class:`LeNet5HalfDAFL`, halves every layer: 15 738.)"""

    widths = (3, 8, 120, 84)


class LeNet5DAFL(_ReLULeNet5):
    """DAFL's and DFAD's LeNet-5 teacher (their public ``lenet.py``): conv 6 → 16 with ReLU and max-pooling,
    a 5×5 convolution to 120, dense 84, 10 — 61 706 parameters. Inputs normalised with (0.1307, 0.3081)."""

    conv_fc1 = True


class LeNet5HalfDAFL(_ReLULeNet5):
    """DAFL's and DFAD's LeNet-5-Half student: every layer of :class:`LeNet5DAFL` halved (conv 3 → 8, conv
    to 60, dense 42) — 15 738 parameters."""

    widths = (3, 8, 60, 42)
    conv_fc1 = True
