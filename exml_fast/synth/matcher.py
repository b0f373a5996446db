"""BNStatsMatcher: BatchNorm-statistic matching for any model, as a context manager."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from exml_fast._utils.checks import check_choice
from exml_fast.ops.bn_match_loss import bn_match_loss
from exml_fast.ops.bn_stats import bn_stats, check_running_stat, frozen_bn_stats
from exml_fast.reference.bn_match_loss import bn_match_loss as reference_bn_match_loss
from exml_fast.reference.bn_stats import BN_LOSS_FORMS, acc_dtype, combine_bn_loss, frozen_bn_scale_shift

# The BatchNorm classes whose eval-mode forward is exactly ``x * scale + shift`` (subclasses may override it).
_FUSABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: The input dtypes the fused forward takes, by device type: on CUDA also the 16-bit ones of autocast (the
#: fused kernel saves launches there); on the CPU, where bf16 synthesis is rare and the fused kernel was not
#: measured against PyTorch's bf16 BatchNorm, those keep PyTorch's own.
_FUSED_DTYPES = {"cpu": (torch.float32, torch.float64),
                 "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


class _Stat(NamedTuple):
    """One BatchNorm call of the latest forward: its input's statistics and what they are matched to."""

    name: str
    weight: float
    mean: torch.Tensor
    var: torch.Tensor
    running_mean: torch.Tensor  # in mean's dtype
    running_var: torch.Tensor
    eps: float


class BNStatsMatcher:
    """Matches the statistics of every BatchNorm layer's input to its running ones.

    Inside the `with` block, each forward of `model` collects the batch statistics
    of every BatchNorm call's input (`bn_stats`, or `frozen_bn_stats` fused with the
    layer) for every BatchNorm1d/2d/3d, SyncBatchNorm or subclass that tracks
    running statistics; `loss()` then forms all the layers'
    `bn_stats_loss(input, running_mean, running_var, form=form)` terms and their
    weighted sum in one op (`exml_fast.ops.bn_match_loss`): the BN term costs one
    statistics op per layer forward and one backward (none beyond the layer's own
    in the fused path), plus a fixed two, whatever the number of layers. Every layer counts (a layer called
    twice in one forward counts twice); the first layer, in module order, is
    weighted by `first_bn_multiplier`. The hooks are removed when the block
    exits, also after an exception.

    Example::

        with BNStatsMatcher(teacher, first_bn_multiplier=10.0) as bn:
            for _ in range(steps):
                logits = teacher(x)                       # fills the terms
                loss = F.cross_entropy(logits, y) + 0.01 * bn.loss()
                ...

    Args:
        model: any nn.Module; it is not modified beyond the temporary hooks (and, with
            ``fused``, the BatchNorm layers' temporarily replaced forward).
        form: "l2" (DeepInversion), "mse" or "sq_std" (ExML); see
            `exml_fast.ops.bn_stats_loss`. "sq_std" uses each layer's own eps.
        first_bn_multiplier: weight of the first BatchNorm layer's term
            (DeepInversion's public code used 10).
        allow_empty: accept a model without BatchNorm layers; `loss()` is then 0.
        fused: for every plain BatchNorm1d/2d/3d layer, replace the layer's
            forward inside the block by :func:`exml_fast.ops.frozen_bn_stats`
            whenever the call allows it (layer in eval mode, its affine
            parameters not requiring gradients, an input that does — a frozen
            teacher in synthesis; fp32/fp64 inputs, and on CUDA also the fp16/bf16
            ones of autocast, whose output keeps the input's dtype as PyTorch's
            BatchNorm does): the layer's output and its input's
            statistics from one pass, and the whole input gradient from one
            backward sweep instead of three. Other calls and layers take the
            hook path; the numbers agree up to rounding.

    Each forward of `model` itself starts a fresh set of terms, so `loss()`
    always refers to the latest forward. Entering the same matcher again while
    it is active (nesting) is allowed and keeps one set of hooks; separate
    matchers on one model each keep their own hooks and give the same numbers.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        form: str = "l2",
        first_bn_multiplier: float = 1.0,
        allow_empty: bool = False,
        fused: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"BNStatsMatcher: model must be an nn.Module; got {type(model).__name__}")
        check_choice(form, "form", "BNStatsMatcher", BN_LOSS_FORMS)
        self.model = model
        self.form = form
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.allow_empty = allow_empty
        self.fused = bool(fused)
        self.layers: list[tuple[str, _BatchNorm]] = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
        ]
        if not self.layers and not allow_empty:
            raise ValueError(
                f"BNStatsMatcher: {type(model).__name__} has no BatchNorm layer with running "
                "statistics to match; pass allow_empty=True to accept such a model "
                "(loss() is then 0)"
            )
        self._stats: list[_Stat] = []
        self._loss: torch.Tensor | None = None  # loss() of the latest forward, once asked
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._depth = 0
        self._forwards = 0

    # -- context management -------------------------------------------------
    def __enter__(self) -> BNStatsMatcher:
        if self._depth == 0:
            self._attach()
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._depth -= 1
        if self._depth == 0:
            self._detach()
        return False

    @property
    def active(self) -> bool:
        """Whether the hooks are attached."""
        return bool(self._handles)

    def _attach(self) -> None:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward))
            for i, (name, layer) in enumerate(self.layers):
                weight = self.first_bn_multiplier if i == 0 else 1.0
                if self.fused and type(layer) in _FUSABLE and "forward" not in layer.__dict__:
                    layer.forward = functools.partial(self._fused_forward, name, weight, layer)
                    self._patched.append(layer)
                else:
                    hook = functools.partial(self._on_bn_input, name, weight)
                    self._handles.append(layer.register_forward_pre_hook(hook))
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self._patched:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_exml_scale_shift", None)
            layer.__dict__.pop("_exml_running", None)
        self._patched.clear()

    # -- hooks ----------------------------------------------------------------
    def _on_model_forward(self, module, args) -> None:
        self._stats = []
        self._loss = None
        self._forwards += 1

    def _record(self, name: str, weight: float, layer: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
        rm, rv = self._running(layer, mean.dtype)
        self._stats.append(_Stat(name, weight, mean, var, rm, rv, layer.eps))
        self._loss = None

    @staticmethod
    def _running(layer: _BatchNorm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's running statistics in ``dtype``: themselves when they have it (the usual fp32 case), else
        a copy cast once and kept until they change (no cast per step)."""
        rm, rv = layer.running_mean, layer.running_var
        if rm.dtype == dtype and rv.dtype == dtype:
            return rm, rv
        key = (rm._version, rv._version, dtype)
        cached = layer.__dict__.get("_exml_running")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, rm.to(dtype), rv.to(dtype))
            layer.__dict__["_exml_running"] = cached
        return cached[1], cached[2]

    def _on_bn_input(self, name: str, weight: float, layer: _BatchNorm, args) -> None:
        x = args[0]
        mean, var = bn_stats(x)
        for t, what in ((layer.running_mean, "running_mean"), (layer.running_var, "running_var")):
            check_running_stat(t, f"{name}.{what}", x.shape[1], x, op="BNStatsMatcher")
        self._record(name, weight, layer, mean, var)

    def _fused_forward(self, name: str, weight: float, layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        if (layer.training or not torch.is_grad_enabled() or not x.requires_grad
                or x.dtype not in _FUSED_DTYPES.get(x.device.type, ())
                or any(p.requires_grad for p in params)):
            self._on_bn_input(name, weight, layer, (x,))
            return type(layer).forward(layer, x)
        layer._check_input_dim(x)
        rm, rv = layer.running_mean, layer.running_var
        acc = acc_dtype(x.dtype)
        key = (rm._version, rv._version, *(p._version for p in params), acc)
        cached = layer.__dict__.get("_exml_scale_shift")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, *frozen_bn_scale_shift(rm, rv, layer.weight, layer.bias, layer.eps, acc))
            layer.__dict__["_exml_scale_shift"] = cached
        # Under autocast the output keeps x's dtype, as PyTorch's BatchNorm does (it is on no autocast list).
        y, mean, var = frozen_bn_stats(x, cached[1], cached[2])
        self._record(name, weight, layer, mean, var)
        return y

    # -- results ------------------------------------------------------------------
    def loss(self) -> torch.Tensor:
        """Weighted sum of the terms of the latest forward of `model` (a scalar tensor), in one op."""
        if not self.layers:
            return torch.zeros(())
        if self._forwards == 0:
            raise RuntimeError(
                "BNStatsMatcher.loss(): no forward of the model has run inside the `with` block yet"
            )
        if not self._stats:
            raise RuntimeError(
                "BNStatsMatcher.loss(): the latest forward of the model reached no BatchNorm layer"
            )
        if self._loss is None:
            st = self._stats
            args = ([s.mean for s in st], [s.var for s in st], [s.running_mean for s in st],
                    [s.running_var for s in st])
            kwargs = dict(weight=[s.weight for s in st], eps=[s.eps for s in st], form=self.form)
            first = st[0].mean
            if all(s.mean.dtype == first.dtype and s.mean.device == first.device for s in st):
                self._loss = bn_match_loss(*args, **kwargs)
            else:  # layers in several dtypes or devices (a model split across GPUs): layer by layer
                self._loss = reference_bn_match_loss(*args, **kwargs)[0]
        return self._loss

    def per_layer(self) -> list[tuple[str, torch.Tensor]]:
        """(layer name, weighted term) of the latest forward, in call order; they sum to `loss()` (up to
        rounding). Each term is formed here, layer by layer (differentiable, off the hot path)."""
        out = []
        for s in self._stats:
            term = combine_bn_loss(s.mean, s.var, s.running_mean, s.running_var, form=self.form, eps=s.eps)
            out.append((s.name, term * s.weight if s.weight != 1.0 else term))
        return out

    def reset(self) -> None:
        """Forgets the collected statistics."""
        self._stats = []
        self._loss = None
        self._forwards = 0
