"""Supervised training and evaluation of classifiers on in-memory tensors, and zero-shot distillation of a
student on synthetic inputs."""

from exml_fast.training.core import *  # noqa: F401,F403
from exml_fast.training.core import __all__  # noqa: F401
