"""Datasets read from local files: MNIST / Fashion-MNIST (IDX, checksummed), CIFAR-10 / -100 (python pickles)
and auxiliary inputs."""

from exml_fast.data import cifar as _cifar
from exml_fast.data import datasets as _datasets
from exml_fast.data.cifar import *  # noqa: F401,F403
from exml_fast.data.datasets import *  # noqa: F401,F403

__all__ = [*_datasets.__all__, *_cifar.__all__]
