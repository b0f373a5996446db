"""Param Avg (§5): the running mean of the experts' parameters, one model in memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exml_fast.cl.strategies.base import Strategy, expert_name, frozen_copy
from exml_fast.cl.strategies.registry import BuildContext, register_strategy

__all__ = ["ParameterAverage"]


class ParameterAverage(Strategy):
    """The running mean of the experts' parameters and buffers: one model in memory.

    After i experts the model holds ``θ̄_i = θ̄_{i-1} + (θ_i − θ̄_{i-1}) / i``
    (every floating-point parameter and buffer, BatchNorm statistics
    included; integer buffers such as ``num_batches_tracked`` take the
    latest expert's value). All experts need the same architecture.

    Args:
        model: None (a copy of the first expert's model becomes the average)
            or a model of the experts' architecture to hold the average.
    """

    name = "param-avg"

    def __init__(self, model: nn.Module | None = None, *, device: torch.device | str | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"ParameterAverage: model must be an nn.Module or None; got {type(model).__name__}")
        if device is None and model is not None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else None
        super().__init__(device=device, seed=seed, progress=progress)
        self.model = model
        self._spec: dict[str, Any] | None = None

    def train(self, expert) -> None:
        self._check_expert(expert)
        dev = self._device()
        new = expert.model.state_dict()
        if self.model is None:
            self.model = frozen_copy(expert.model).to(dev)
        own = self.model.state_dict()
        if own.keys() != new.keys():
            diff = sorted(set(own) ^ set(new))[:5]
            raise ValueError(f"ParameterAverage.train: expert {expert_name(expert)} has a different architecture "
                             f"(entries not in both: {diff})")
        for k, v in own.items():
            if v.shape != new[k].shape:
                raise ValueError(f"ParameterAverage.train: expert {expert_name(expert)} has {k} of shape "
                                 f"{tuple(new[k].shape)}, the average {tuple(v.shape)}")
        i = self.experiences_seen + 1
        with torch.no_grad():
            for k, v in own.items():
                w = new[k].to(v.device)
                if i == 1 or not v.is_floating_point():
                    v.copy_(w)
                else:
                    v.add_(w.to(v.dtype) - v, alpha=1.0 / i)
        self._spec = {"arch": getattr(expert, "arch", None), "arch_kwargs": dict(getattr(expert, "arch_kwargs", {}))}
        self._record(expert)

    @torch.no_grad()
    def logits(self, x, task_ids):
        self.model.eval()
        return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "spec": self._spec,
                "model": None if self.model is None else self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from exml_fast.models import build_model

        super().load_state_dict(state)
        self._spec = state["spec"]
        if state["model"] is None:
            return
        if self.model is None:
            self.model = frozen_copy(build_model(self._spec["arch"], **self._spec["arch_kwargs"])).to(self._device())
        self.model.load_state_dict(state["model"])


@register_strategy("param-avg", keeps_data=False, help="the running mean of the experts' parameters")
def _param_avg(ctx: BuildContext, opt: dict[str, Any]) -> ParameterAverage:
    return ParameterAverage(device=ctx.device, seed=ctx.seed, progress=ctx.progress)
