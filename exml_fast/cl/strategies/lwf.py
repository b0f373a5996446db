"""Learning without Forgetting (Li & Hoiem; LwF.MC, iCaRL's form): :class:`LwF` and its command-line name
``lwf``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast.cl.strategies.base import check_float, frozen_copy
from exml_fast.cl.strategies.cil_base import CIL_DEFAULTS, CIL_OPTIONS, DataStrategy, data_strategy_kwargs
from exml_fast.cl.strategies.options import StrategyOption
from exml_fast.cl.strategies.registry import BuildContext, build_data_learner, register_strategy

__all__ = ["LWF_FORMS", "LWF_OPTIONS", "LWF_OWN_OPTIONS", "LwF"]

#: LwF's loss forms: "softmax" (Li & Hoiem: cross-entropy on the active units, KD on the old units' softened
#: softmax) and "mc" (LwF.MC, iCaRL's form: binary cross-entropy with sigmoids on every active unit, summed
#: over them, the old units' targets the previous model's sigmoids).
LWF_FORMS = ("softmax", "mc")

#: LwF's own run options (its distillation's), declared here; it reads the class-incremental ones too.
LWF_OWN_OPTIONS = (
    StrategyOption("distill_temperature", float, 2.0, "lwf: distillation temperature (default: 2)"),
    StrategyOption("distill_weight", float, 1.0, "lwf: weight of the distillation term (default: 1)"),
    StrategyOption("distill_by_task", bool, False, "lwf: weigh cross-entropy 1/t and distillation (1 - 1/t) at "
                                                   "task t, as van de Ven et al.'s code (default: off)"),
    StrategyOption("lwf_form", str, "softmax", "lwf: softmax (Li & Hoiem: cross-entropy + KD) or mc (LwF.MC: "
                                               "sigmoid binary cross-entropy, iCaRL's form)"),
)
#: The run options LwF reads: the class-incremental ones and its own.
LWF_OPTIONS = CIL_OPTIONS | {o.name for o in LWF_OWN_OPTIONS}


class LwF(DataStrategy):
    """Learning without Forgetting (Li & Hoiem): before each experience after the first, a frozen copy of
    the learner is the teacher of the old classes on the new data.

    ``form="softmax"``: ``w_ce · CE(active units) + w_kd · kd_loss(old units, T)``, the distillation the
    fused :func:`exml_fast.ops.kd_loss` (``T² · KL(softmax(prev / T) || softmax(model / T))`` over the old
    classes' logits, Hinton's scaling). ``form="mc"`` (LwF.MC, iCaRL's form): the binary cross-entropy of
    sigmoids summed over the active units and averaged over the batch, with one-hot targets on the new
    classes' units and the previous model's sigmoids on the old ones (``distill_weight``, ``temperature`` and
    ``by_task`` do not apply).

    Weights (softmax form): ``by_task=False`` (default): ``w_ce = 1``, ``w_kd = distill_weight``;
    ``by_task=True`` (van de Ven et al.'s code): at experience t, ``w_ce = 1/t`` and
    ``w_kd = distill_weight · (1 − 1/t)``.
    """

    name = "lwf"

    def __init__(self, model: nn.Module, *, temperature: float = 2.0, distill_weight: float = 1.0,
                 by_task: bool = False, form: str = "softmax", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        owner = type(self).__name__
        self.temperature = check_float(temperature, "temperature", owner, positive=True)
        self.distill_weight = check_float(distill_weight, "distill_weight", owner)
        self.by_task = bool(by_task)
        check_choice(form, "form", owner, LWF_FORMS)
        self.form = form
        self.prev: nn.Module | None = None  # the frozen previous model, while a task after the first trains
        self._old: torch.Tensor | None = None  # the classes it answers for

    def config(self) -> dict[str, Any]:
        return {**super().config(), "temperature": self.temperature, "distill_weight": self.distill_weight,
                "by_task": self.by_task, "form": self.form}

    def before_experience(self, exp, i: int) -> None:
        self.prev = frozen_copy(self.model) if self.experiences_seen else None
        self._old = torch.tensor(self.classes_seen, dtype=torch.int64, device=self._device())

    def cleanup_experience(self) -> None:
        self.prev = None

    def trained_models(self):
        return (self.model, self.prev)

    def criterion(self, logits, x, y, step):
        active, pos, t = step.active, step.pos, step.experience
        if self.form == "mc":
            target = F.one_hot(pos[y], active.numel()).to(logits.dtype)
            if self.prev is not None:
                with torch.no_grad():
                    old = torch.sigmoid(self.prev(x).index_select(1, self._old))
                target[:, pos[self._old]] = old.to(logits.dtype)
            # iCaRL's loss: the binary cross-entropies summed over the active units, averaged over the batch
            return F.binary_cross_entropy_with_logits(logits.index_select(1, active), target,
                                                      reduction="sum") / logits.shape[0]
        ce = F.cross_entropy(logits.index_select(1, active), pos[y])
        if self.prev is None:
            return ce
        from exml_fast.ops import kd_loss

        with torch.no_grad():
            teacher = self.prev(x).index_select(1, self._old)
        kd = kd_loss(logits.index_select(1, self._old), teacher, temperature=self.temperature)
        w_ce, w_kd = (1.0 / t, self.distill_weight * (1.0 - 1.0 / t)) if self.by_task else (1.0, self.distill_weight)
        return w_ce * ce + w_kd * kd


@register_strategy("lwf", keeps_data=False, data=True, defaults=CIL_DEFAULTS,
                   options=(*sorted(CIL_OPTIONS), *LWF_OWN_OPTIONS),
                   help="class-incremental: Learning without Forgetting (distil the previous model's old classes)")
def _lwf(ctx: BuildContext, opt: dict[str, Any]) -> LwF:
    return LwF(build_data_learner(ctx, opt), temperature=opt["distill_temperature"],
               distill_weight=opt["distill_weight"], by_task=opt["distill_by_task"], form=opt["lwf_form"],
               **data_strategy_kwargs(ctx, opt))
