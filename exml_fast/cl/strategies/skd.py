"""SKD's exemplar-free class-incremental learning (a knowledge delegator trained data-free on the previous model):
:class:`SKDCIL` and its command-line name ``skd``."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast.cl.strategies.base import check_float, check_int, derive_seed
from exml_fast.cl.strategies.cil_base import CIL_DEFAULTS, CIL_OPTIONS, DataStrategy, data_strategy_kwargs
from exml_fast.cl.strategies.registry import BuildContext, build_data_learner, register_strategy
from exml_fast.models.features import FeatureTap
from exml_fast.models.generators import GENERATOR_ARCHS
from exml_fast.synth.generative import GenerativeSynthesizer
from exml_fast.synth.generative_losses import feature_cosine_discrepancy

__all__ = ["SKDCIL", "SKD_DEFAULTS", "SKD_OPTIONS"]


class SKDCIL(DataStrategy):
    """SKD's exemplar-free class-incremental learning (papers/self-distilled-knowledge-delegator.txt §III-C):
    before each task after the first, a knowledge delegator ``D_n`` (a
    :class:`~exml_fast.synth.GenerativeSynthesizer`, preset "skd") is trained data-free against the frozen
    previous model ``T_n`` — starting from ``D_{n-1}``, so one delegator is fine-tuned across tasks — and
    every training step of ``T_{n+1}`` (which starts from ``T_n``) takes a minibatch of new real data and one
    of the same size of fresh delegator samples labelled by ``T_n``'s argmax over the old classes (Eq. 5)::

        L = γ_n · CE(active units) + ψ(x̂, T_n, T_{n+1})          (Eq. 11; ψ: Eq. 9 on the whole batch)
        γ_n = β / (N · Σ_{i<=n} |C_i|)                            (Eq. 12; N tasks, C_i the classes of task i)

    ψ is the feature cosine discrepancy of the two models' penultimate features. The first task is plain
    cross-entropy. Only the learner and the delegator are kept between tasks: no image, real or synthetic.

    Args:
        model: the learner (with BatchNorm layers, whose statistics the delegator matches).
        input_shape, mean, std: of the scenario's images (C, H, W) and their normalisation.
        num_tasks: N of Eq. 12 (the scenario's number of experiences).
        beta: β of Eq. 12 (SKD: 5).
        delegator_iterations, delegator_batch_size: explore steps and batch of each task's delegator fit.
        delegator_options: further :class:`~exml_fast.synth.GenerativeSynthesizer` settings.
        **kwargs: as :class:`DataStrategy`.
    """

    name = "skd"

    def __init__(self, model: nn.Module, *, input_shape, mean=None, std=None, num_tasks: int, beta: float = 5.0,
                 delegator_iterations: int = 200, delegator_batch_size: int = 64,
                 delegator_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        owner = type(self).__name__
        if input_shape is None or len(tuple(input_shape)) != 3:
            raise ValueError(f"{owner}: input_shape (C, H, W) of the images is needed; got {input_shape!r}")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.num_tasks = check_int(num_tasks, "num_tasks", owner, low=1)
        self.beta = check_float(beta, "beta", owner, positive=True)
        self.delegator_iterations = check_int(delegator_iterations, "delegator_iterations", owner, low=1)
        self.delegator_batch_size = check_int(delegator_batch_size, "delegator_batch_size", owner, low=2)
        self.delegator_options = dict(delegator_options or {})
        self.delegator: nn.Module | None = None  # kept across tasks (and in checkpoints)
        self.prev: nn.Module | None = None
        self._synth: GenerativeSynthesizer | None = None
        self._old: torch.Tensor | None = None
        self._gamma = 1.0
        self.delegator_stats: list[dict[str, Any]] = []

    def config(self) -> dict[str, Any]:
        return {**super().config(), "input_shape": list(self.input_shape),
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "num_tasks": self.num_tasks, "beta": self.beta,
                "delegator_iterations": self.delegator_iterations,
                "delegator_batch_size": self.delegator_batch_size, "delegator_options": self.delegator_options}

    def _synthesizer(self, teacher: nn.Module) -> GenerativeSynthesizer:
        return GenerativeSynthesizer(teacher, input_shape=self.input_shape, mean=self.mean, std=self.std,
                                     num_classes=self.num_classes, device=self._device(), delegator=self.delegator,
                                     balance=False, **self.delegator_options)

    def before_experience(self, exp, i: int) -> None:
        if not self.experiences_seen:
            return
        old = self.freeze_previous()
        seen = len(set(old) | {int(c) for c in exp.classes})
        self._gamma = self.beta / (self.num_tasks * seen)
        self._synth = self._synthesizer(self.prev)
        t0 = time.perf_counter()
        result = self._synth.fit(self.delegator_iterations, batch_size=self.delegator_batch_size,
                                 generator=derive_seed(self.seed, "skd", i), progress=self.progress)
        self.delegator = self._synth.delegator
        last = {k: v[-1] for k, v in result.history.items() if v}
        self.delegator_stats.append({"experience": i, "fit_s": round(time.perf_counter() - t0, 3), **last})

    def cleanup_experience(self) -> None:
        self.prev = self._synth = self._old = None

    def history_info(self, i: int) -> dict[str, Any]:
        done = [st for st in self.delegator_stats if st["experience"] == i]
        return {"delegator": done} if done else {}

    def trained_models(self):
        return (self.model, self.prev)

    def step_loss(self, xb, yb, step):
        if self.prev is None:
            return super().step_loss(xb, yb, step)
        gen = step.generator
        lo, total = step.rows or (0, xb.shape[0])
        with torch.no_grad():
            self.delegator.eval()
            z = torch.randn(total, self._synth.latent_dim, generator=gen)[lo : lo + xb.shape[0]]
            xs = self.delegator(z.to(self._device()))
        both = torch.cat([xb, xs])
        with FeatureTap(self.prev) as t_tap, torch.no_grad():
            old_logits = self.prev(both)
            t_feat = t_tap.features
        ys = self._old[old_logits[xb.shape[0]:].index_select(1, self._old).argmax(1)]
        with FeatureTap(self.model) as s_tap:
            logits = step.forward(both).index_select(1, step.active)
            s_feat = s_tap.features
        ce = F.cross_entropy(logits, step.pos[torch.cat([yb, ys])])
        return self._gamma * ce + feature_cosine_discrepancy(t_feat, s_feat)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["delegator"] = None if self.delegator is None else self.delegator.state_dict()
        state["delegator_stats"] = list(self.delegator_stats)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.delegator_stats = list(state.get("delegator_stats", []))
        if state.get("delegator") is not None:
            synth = self._synthesizer(self.model)
            synth.load_state_dict(state["delegator"])
            self.delegator = synth.delegator


#: SKD-CIL reads the class-incremental options and the delegator's: synth_iterations (explore steps of each
#: task's fit; default 200), synth_batch_size (its batch; default 64) and gen_arch (its network; default
#: skd-small, SKD's Table IV).
SKD_OPTIONS = CIL_OPTIONS | {"synth_iterations", "synth_batch_size", "gen_arch"}
SKD_DEFAULTS = {**CIL_DEFAULTS, "synth_iterations": 200, "synth_batch_size": 64, "gen_arch": "skd-small"}


@register_strategy("skd", keeps_data=False, data=True, defaults=SKD_DEFAULTS, options=SKD_OPTIONS,
                   help="class-incremental: SKD (a knowledge delegator trained data-free on the previous model, "
                        "its samples mixed with the new data, feature cosine consolidation; no image kept)")
def _skd(ctx: BuildContext, opt: dict[str, Any]) -> SKDCIL:
    sc = ctx.scenario
    # The delegator's settings come from the synthesis options: refused here under the names the user gave.
    iterations = check_int(opt["synth_iterations"], "synth_iterations", "skd", low=1)
    batch = check_int(opt["synth_batch_size"], "synth_batch_size", "skd", low=2)
    arch = check_choice(opt["gen_arch"], "gen_arch", "skd", GENERATOR_ARCHS)
    return SKDCIL(build_data_learner(ctx, opt), input_shape=sc.input_shape, mean=sc.mean, std=sc.std,
                  num_tasks=len(sc), delegator_iterations=iterations, delegator_batch_size=batch,
                  delegator_options={"generator_arch": arch}, **data_strategy_kwargs(ctx, opt))
