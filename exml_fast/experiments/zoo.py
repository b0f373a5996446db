"""A zoo of small teachers for checking that the synthesizers work out of the box.

Five classifiers of the kinds people have, each trained for a fraction of an epoch on 32 x 32 MNIST or
Fashion-MNIST with :func:`exml_fast.training.train_classifier` (SGD, momentum 0.9, weight decay 5e-4; a
constant lr, cosine for MobileNetV2):

- ``lenet5_bn``: :class:`~exml_fast.models.LeNet5BN` (4 BatchNorm layers) on MNIST;
- ``resnet18_slim``: :func:`~exml_fast.models.resnet18_cifar_slim` with one input channel (20 BN layers) on MNIST;
- ``mobilenet_v2``: :func:`~exml_fast.models.mobilenet_v2` with one input channel (52 BN layers) on Fashion-MNIST;
- ``lenet5``: the BN-free :class:`~exml_fast.models.LeNet5` (Tanh, AvgPool) on MNIST: priors only;
- ``groupnorm``: :class:`GroupNormCNN`, a small CNN with GroupNorm (no running statistics) on MNIST.

``python_tests/synth/test_zoo.py`` asks each to be inverted by DeepInversion's and ModelInversion's defaults;
``benches/zoo_agreement.py`` records the figures. Each entry also says how many synthesis steps the test and
the record give each synthesizer (20 images in one batch): small enough for a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.models import LeNet5, LeNet5BN, mobilenet_v2, resnet18_cifar_slim
from exml_fast.synth.batch import SyntheticBatch
from exml_fast.training import evaluate, train_classifier

__all__ = ["ZOO", "GroupNormCNN", "ZooTeacher", "agreement", "normalisation", "train_zoo_teacher"]


class GroupNormCNN(nn.Module):
    """A LeNet-like CNN with GroupNorm, which keeps no running statistics (nothing for BN matching).

    Layers (shapes for a (N, C, 32, 32) input)::

        conv5x5(C→8)  → GroupNorm(2 groups) → ReLU → MaxPool2    (N, 8, 14, 14)
        conv5x5(8→16) → GroupNorm(4 groups) → ReLU → MaxPool2    (N, 16, 5, 5)
        flatten → Linear(400→120) → ReLU → Linear(120→84) → ReLU  (N, 84)
        classifier: Linear(84→num_classes)                        (N, num_classes)
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 5, bias=False), nn.GroupNorm(2, 8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5, bias=False), nn.GroupNorm(4, 16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(400, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, 32, 32) → logits (N, num_classes)."""
        return self.classifier(self.features(x))


@dataclasses.dataclass(frozen=True)
class ZooTeacher:
    """How one zoo teacher is built and trained, and the synthesis budget it gets.

    Attributes:
        dataset: "mnist" or "fashion-mnist" (32 x 32, one channel, normalised).
        build: ``build() -> nn.Module`` (10 classes, one input channel).
        train_images: the first ``train_images`` of a seeded permutation of the train split, one pass.
        lr, batch_size: SGD's learning rate and minibatch.
        di_iterations, mi_iterations: synthesis steps per batch that DeepInversion and ModelInversion (Adam lr
            0.01, the slower one) get in the test and the record.
        kind: a few words for tables.
        schedule: the lr schedule of :func:`~exml_fast.training.train_classifier`.
    """

    dataset: str
    build: Callable[[], nn.Module]
    train_images: int
    lr: float
    batch_size: int
    di_iterations: int
    mi_iterations: int
    kind: str
    schedule: str = "constant"


#: The zoo, by name.
# MobileNetV2 gets half an epoch: after 10000 or 20000 images (71 %, 77 %) it still mixed up sandals and
# sneakers, and no synthesizer makes images of a class its teacher cannot tell apart. With a constant lr its
# accuracy after the half epoch depended on the training threads (about 80 % on 2 threads, 62 % on one: the
# last steps of lr 0.05 leave it wherever they happen to); the cosine schedule ends on a settled model
# (81-85 % on one or two threads, AVX-512 or AVX2). Its budgets are the largest: DeepInversion reached 75-100 %
# of 20 images in 200 steps and 100 % in 400 (constant lr); with the cosine teachers, 100 % on one thread and on
# two under AVX2, 95 % on two AVX-512 threads, where one sneaker stays an ankle boot at 400, 600 and 800 steps
# alike (so the budget stays 400). ModelInversion (Adam lr 0.01) stalled at 90 % in 800 steps on one of its
# teachers (training threads change the teacher a little) and reached 95-100 % in 1600.
ZOO: dict[str, ZooTeacher] = {
    "lenet5_bn": ZooTeacher("mnist", lambda: LeNet5BN(10, in_channels=1), 10000, 0.01, 64, 200, 200,
                            "LeNet-5, 4 BN layers"),
    "resnet18_slim": ZooTeacher("mnist", lambda: resnet18_cifar_slim(10, in_channels=1), 4000, 0.05, 32, 200, 400,
                                "slim ResNet-18, 20 BN layers"),
    "mobilenet_v2": ZooTeacher("fashion-mnist", lambda: mobilenet_v2(10, in_channels=1), 30000, 0.05, 64, 400, 1600,
                               "MobileNetV2, 52 BN layers", schedule="cosine"),
    "lenet5": ZooTeacher("mnist", lambda: LeNet5(10, in_channels=1), 10000, 0.05, 64, 200, 200,
                         "LeNet-5, no normalisation"),
    "groupnorm": ZooTeacher("mnist", lambda: GroupNormCNN(10, in_channels=1), 10000, 0.05, 64, 200, 200,
                            "CNN with GroupNorm"),
}


def train_zoo_teacher(name: str, *, seed: int = 0, root=None,
                      test_images: int = 2000) -> tuple[nn.Module, float, float]:
    """Builds and trains ``ZOO[name]`` on the CPU; returns (the teacher in eval mode, its accuracy on the first
    ``test_images`` of the test split, the training seconds). The seed drives the initialisation and the order."""
    check_choice(name, "name", "train_zoo_teacher", ZOO)
    z = ZOO[name]
    x, y = mnist_tensors("train", dataset=z.dataset, root=root)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[: z.train_images]
    # The initialisation and MobileNetV2's dropout draw from the global generator: seeded here, put back after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = z.build()
        t0 = time.perf_counter()
        train_classifier(model, x[idx], y[idx], epochs=1, batch_size=z.batch_size, lr=z.lr, generator=g,
                         schedule=z.schedule)
        seconds = time.perf_counter() - t0
    x_test, y_test = mnist_tensors("test", dataset=z.dataset, root=root)
    return model.eval(), evaluate(model, x_test[:test_images], y_test[:test_images]), seconds


def normalisation(name: str) -> tuple[float, float]:
    """(mean, std) of the zoo teacher's inputs."""
    return DATASET_STATS[ZOO[name].dataset]


def agreement(teacher: nn.Module, batch: SyntheticBatch) -> float:
    """Fraction of ``batch.x`` the teacher (in eval mode, one forward) labels as ``batch.y``."""
    teacher.eval()
    with torch.no_grad():
        hits = int((teacher(batch.x).argmax(1) == batch.y).sum())
    return hits / len(batch.y)  # exact: 18 of 20 is 0.9, not float32's 0.8999999761
