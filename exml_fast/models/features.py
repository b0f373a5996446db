"""A classifier's penultimate features: the input of its last ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureTap", "classifier_layer"]


def classifier_layer(model: nn.Module, owner: str = "penultimate_features") -> nn.Linear:
    """``model``'s classifier: its last ``nn.Linear`` (whose input is the feature of iCaRL's classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{owner}: {type(model).__name__} has no nn.Linear; its last one is taken "
                         "as the classifier whose input is the feature")
    return linears[-1]


class FeatureTap:
    """Records the (N, D) input of ``model``'s classifier layer at each forward, with its autograd graph.

    Example::

        with FeatureTap(teacher) as tap:
            logits = teacher(x)
            f = tap.features        # (N, D), differentiable w.r.t. x and the layers below

    The hook is removed when the block exits, also after an exception.
    """

    def __init__(self, model: nn.Module, *, owner: str = "FeatureTap") -> None:
        self.layer = classifier_layer(model, owner)
        self._features: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> FeatureTap:
        self._handle = self.layer.register_forward_pre_hook(self._grab)
        return self

    def __exit__(self, *exc) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features = None
        return False

    def _grab(self, module, args) -> None:
        self._features = args[0].flatten(1)

    @property
    def features(self) -> torch.Tensor:
        """The classifier's input of the latest forward, flattened to (N, D)."""
        if self._features is None:
            raise RuntimeError("FeatureTap.features: no forward has reached the classifier layer inside the block")
        return self._features
