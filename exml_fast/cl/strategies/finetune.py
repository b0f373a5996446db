"""The bounds of class-incremental learning: :class:`FineTune` (keeps nothing: the lower bound) and :class:`Joint`
(keeps all the data seen: the upper bound), and their command-line names ``finetune`` and ``joint``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exml_fast.cl.strategies.cil_base import CIL_DEFAULTS, CIL_OPTIONS, DataStrategy, data_strategy_kwargs
from exml_fast.cl.strategies.registry import BuildContext, build_data_learner, register_strategy

__all__ = ["FineTune", "Joint"]


class FineTune(DataStrategy):
    """Fine-tuning: each experience trained on its own data with cross-entropy over the classes seen, nothing
    done against forgetting — the lower bound."""

    name = "finetune"


class Joint(DataStrategy):
    """Joint training: each experience trains on all the training data seen so far (it keeps every past
    experience's data, in :attr:`memory_x` / :attr:`memory_y`, and checkpoints it: on Split MNIST about
    250 MB after the last task) — the upper bound."""

    name = "joint"
    keeps_data = True

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.memory_x: torch.Tensor | None = None
        self.memory_y: torch.Tensor | None = None

    def train_set(self, exp):
        x, y = exp.train_x.detach().cpu(), exp.train_y.detach().cpu()
        if self.memory_x is not None:
            if self.memory_x.shape[1:] != x.shape[1:]:
                raise ValueError(f"Joint.train: experience {exp.index}'s images are {tuple(x.shape[1:])}, the "
                                 f"earlier ones {tuple(self.memory_x.shape[1:])}")
            x, y = torch.cat([self.memory_x, x]), torch.cat([self.memory_y, y])
        return x, y

    def after_experience(self, exp, x, y):
        self.memory_x, self.memory_y = x, y  # only once the task is learned: a failed task adds nothing

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory_x": self.memory_x, "memory_y": self.memory_y}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory_x, self.memory_y = state["memory_x"], state["memory_y"]


@register_strategy("finetune", keeps_data=False, data=True, defaults=CIL_DEFAULTS, options=CIL_OPTIONS,
                   help="class-incremental: fine-tune on each task's data (the lower bound)")
def _finetune(ctx: BuildContext, opt: dict[str, Any]) -> FineTune:
    return FineTune(build_data_learner(ctx, opt), **data_strategy_kwargs(ctx, opt))


@register_strategy("joint", keeps_data=True, data=True, defaults=CIL_DEFAULTS, options=CIL_OPTIONS,
                   help="class-incremental: train on all data seen so far (keeps it; the upper bound)")
def _joint(ctx: BuildContext, opt: dict[str, Any]) -> Joint:
    return Joint(build_data_learner(ctx, opt), **data_strategy_kwargs(ctx, opt))
