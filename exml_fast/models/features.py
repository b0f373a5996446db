"""A network's features: its classifier's input (the last ``nn.Linear``'s), or a named layer's output."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureTap", "classifier_layer", "named_layer"]


def classifier_layer(model: nn.Module, owner: str = "penultimate_features") -> nn.Linear:
    """``model``'s classifier: its last ``nn.Linear`` (whose input is the feature of iCaRL's classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{owner}: {type(model).__name__} has no nn.Linear; its last one is taken "
                         "as the classifier whose input is the feature")
    return linears[-1]


def named_layer(model: nn.Module, name: str, owner: str = "named_layer", arg: str = "layer") -> nn.Module:
    """``model``'s submodule called ``name`` in ``model.named_modules()``; otherwise an error that names the
    argument ``arg`` and lists the submodules' names."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{owner}: {arg} must be a submodule's name (a non-empty str) or None; got {name!r}")
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"{owner}: {arg} {name!r} is not a submodule of {type(model).__name__}; its submodules: "
                         f"{shown}")
    return modules[name]


class FeatureTap:
    """Records the (N, D) input of ``model``'s classifier layer at each forward, with its autograd graph; with
    ``layer``, the output of the submodule of that name instead.

    Example::

        with FeatureTap(teacher) as tap:
            logits = teacher(x)
            f = tap.features        # (N, D), differentiable w.r.t. x and the layers below

    The hook is removed when the block exits, also after an exception.

    Args:
        model: the network to tap.
        layer: the name of one of ``model``'s submodules (as ``model.named_modules()`` names it, e.g.
            ``"features.7"``) whose output, flattened to (N, D), is the feature; None: the input of the last
            ``nn.Linear`` (the classifier).
        owner, arg: the caller and its argument's name, for error messages.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, owner: str = "FeatureTap",
                 arg: str = "layer") -> None:
        self.name = layer
        self.layer = classifier_layer(model, owner) if layer is None else named_layer(model, layer, owner, arg)
        self._features: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> FeatureTap:
        if self.name is None:
            self._handle = self.layer.register_forward_pre_hook(self._grab_input)
        else:
            self._handle = self.layer.register_forward_hook(self._grab_output)
        return self

    def __exit__(self, *exc) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features = None
        return False

    def _grab_input(self, module, args) -> None:
        self._features = args[0].flatten(1)

    def _grab_output(self, module, args, output) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"FeatureTap: layer {self.name!r} returned {type(output).__name__}, not a tensor")
        self._features = output.flatten(1)

    @property
    def features(self) -> torch.Tensor:
        """The tapped features of the latest forward, flattened to (N, D)."""
        if self._features is None:
            where = "the classifier layer" if self.name is None else f"layer {self.name!r}"
            raise RuntimeError(f"FeatureTap.features: no forward has reached {where} inside the block")
        return self._features
