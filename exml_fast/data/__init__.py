"""Datasets read from local files: MNIST / Fashion-MNIST (IDX, checksummed) and auxiliary inputs."""

from exml_fast.data.datasets import *  # noqa: F401,F403
from exml_fast.data.datasets import __all__  # noqa: F401
