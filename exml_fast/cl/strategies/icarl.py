"""iCaRL (Rebuffi et al.), the exemplar-based reference: :class:`ICaRL` and its command-line name ``icarl``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast.cl.exemplars import ExemplarMemory, class_means, herding, nearest_mean_logits, penultimate_features
from exml_fast.cl.strategies.base import check_int
from exml_fast.cl.strategies.cil_base import CIL_DEFAULTS, CIL_OPTIONS, data_strategy_kwargs
from exml_fast.cl.strategies.lwf import LwF
from exml_fast.cl.strategies.options import StrategyOption
from exml_fast.cl.strategies.registry import BuildContext, build_data_learner, register_strategy

__all__ = ["ICARL_CLASSIFIERS", "ICARL_OPTIONS", "ICARL_OWN_OPTIONS", "ICaRL"]

#: iCaRL's classifiers: the nearest mean of exemplars, or the network's outputs.
ICARL_CLASSIFIERS = ("nme", "cnn")

#: iCaRL's own run options (its memory's), declared here; it reads the class-incremental ones too.
ICARL_OWN_OPTIONS = (
    StrategyOption("memory_size", int, 2000, "icarl: exemplars kept in all, split evenly over the classes seen "
                                             "(default: 2000)"),
    StrategyOption("classifier", str, "nme", "icarl: nme (nearest mean of exemplars, the default) or cnn (the "
                                             "network's outputs)"),
)
#: The run options iCaRL reads: the class-incremental ones and its own.
ICARL_OPTIONS = CIL_OPTIONS | {o.name for o in ICARL_OWN_OPTIONS}


class ICaRL(LwF):
    """iCaRL (Rebuffi et al.), the exemplar-based reference: a memory of ``memory_size`` real exemplars split
    evenly over the classes seen (:class:`~exml_fast.cl.exemplars.ExemplarMemory`), chosen by herding on the
    L2-normalised penultimate features; each task trains on its data plus the exemplars with LwF.MC's loss
    (sigmoid BCE; the old classes' targets the frozen previous model's sigmoids); predictions by the nearest
    mean of exemplars (``classifier="nme"``, the class means recomputed after each task) or the network's own
    outputs (``"cnn"``). It keeps real data of past tasks (the exemplars).

    Args:
        model: the learner (its last ``nn.Linear`` is the classifier; its input is the feature).
        memory_size: K, the exemplars kept in all (iCaRL: 2000).
        classifier: "nme" or "cnn".
        **kwargs: as :class:`DataStrategy` (``form`` is always "mc").
    """

    name = "icarl"
    keeps_data = True
    #: The exemplars are herded from each task's own images, so every class of a task needs one.
    exemplars_from_data = True

    def __init__(self, model: nn.Module, *, memory_size: int = 2000, classifier: str = "nme",
                 **kwargs: Any) -> None:
        owner = type(self).__name__
        if kwargs.pop("form", "mc") != "mc":
            raise ValueError(f"{owner}: form is always 'mc' (iCaRL's sigmoid loss)")
        super().__init__(model, form="mc", **kwargs)
        check_choice(classifier, "classifier", owner, ICARL_CLASSIFIERS)
        self.classifier = classifier
        check_int(memory_size, "memory_size", owner, low=1)
        if memory_size < self.num_classes:  # K // (classes seen) per class: 0 leaves a class without a mean
            raise ValueError(f"{owner}: memory_size must be at least num_classes ({self.num_classes}), so that "
                             f"every class keeps an exemplar; got {memory_size}")
        self.memory = ExemplarMemory(memory_size)
        self.means: torch.Tensor | None = None  # (C, D) normalised class means of the exemplars' features
        self.mean_classes: list[int] = []

    def config(self) -> dict[str, Any]:
        cfg = {**super().config(), "memory_size": self.memory.capacity, "classifier": self.classifier}
        for key in ("temperature", "distill_weight", "by_task"):  # LwF.MC's loss does not use them
            cfg.pop(key)
        return cfg

    def _check_experience(self, exp) -> None:
        super()._check_experience(exp)
        if self.exemplars_from_data:
            missing = sorted({int(c) for c in exp.classes} - set(torch.unique(exp.train_y).tolist()))
            if missing:  # refused before the task's training, not after it (herding has nothing to choose from)
                raise ValueError(f"{type(self).__name__}.train: experience {exp.index} has no training sample of "
                                 f"class(es) {missing}; herding needs at least one image of each class of the "
                                 "task (a cap on the training data, e.g. --max-train, too small for its classes?)")

    def train_set(self, exp):
        x, y = exp.train_x, exp.train_y
        if len(self.memory):
            mx, my = self.memory.tensors()
            x, y = torch.cat([x.detach().cpu(), mx]), torch.cat([y.detach().cpu(), my])
        return x, y

    def after_experience(self, exp, x, y):
        """Shrinks every stored class to m = K // (classes seen), stores m exemplars of each new class and
        recomputes the class means of the exemplars' features."""
        classes = sorted(set(self.classes_seen) | {int(c) for c in exp.classes})
        m = self.memory.per_class(len(classes))
        self.memory.reduce(m)
        self._add_exemplars(exp, sorted(int(c) for c in exp.classes), m)
        mx, my = self.memory.tensors()
        self.mean_classes = self.memory.classes
        self.means = class_means(penultimate_features(self.model, mx), my, self.mean_classes)

    def _add_exemplars(self, exp, new: list[int], m: int) -> None:
        """Stores ``m`` exemplars of each class of ``new``: iCaRL's herding over the experience's images."""
        new_x, new_y = exp.train_x.detach().cpu(), exp.train_y.detach().cpu()
        feats = penultimate_features(self.model, new_x)
        for c in new:
            idx = (new_y == c).nonzero().flatten()
            self.memory.add(c, new_x[idx[herding(feats[idx], m)]])

    @torch.no_grad()
    def logits(self, x, task_ids):
        if self.classifier == "cnn" or self.means is None:
            return super().logits(x, task_ids)
        f = penultimate_features(self.model, x)
        means = self.means.to(f.device)
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), device=f.device)
        out[:, torch.tensor(self.mean_classes, device=f.device)] = nearest_mean_logits(f, means)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": self.memory.state_dict(), "means": self.means,
                "mean_classes": self.mean_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
        self.means, self.mean_classes = state["means"], list(state["mean_classes"])


@register_strategy("icarl", keeps_data=True, data=True, defaults=CIL_DEFAULTS,
                   options=(*sorted(CIL_OPTIONS), *ICARL_OWN_OPTIONS),
                   help="class-incremental: iCaRL (herding exemplars of real images, BCE + distillation, nearest "
                        "mean of exemplars; keeps K real images)")
def _icarl(ctx: BuildContext, opt: dict[str, Any]) -> ICaRL:
    return ICaRL(build_data_learner(ctx, opt), memory_size=opt["memory_size"], classifier=opt["classifier"],
                 **data_strategy_kwargs(ctx, opt))
