"""Class-incremental learning with DeepInversion images in place of old data: :class:`DeepInversionCIL` (Yin et
al., §4.5: images of the old classes mixed with the new data; ``deepinversion-cil`` and
``deepinversion-cil-balanced``) and :class:`SyntheticExemplars` (iCaRL whose exemplars are DeepInversion images;
``synthetic-exemplars``). Neither keeps a real image of a past task."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast._utils.dist import is_sharded
from exml_fast.cl.exemplars import classifier_layer, penultimate_features
from exml_fast.cl.strategies.base import check_float, check_int, derive_seed, frozen_copy
from exml_fast.cl.strategies.cil_base import CIL_DEFAULTS, CIL_OPTIONS, DataStrategy, data_strategy_kwargs
from exml_fast.cl.strategies.icarl import ICARL_OPTIONS, ICaRL
from exml_fast.cl.strategies.options import StrategyOption
from exml_fast.cl.strategies.registry import BuildContext, build_data_learner, register_strategy
from exml_fast.training import augment_batch

__all__ = ["DI_CIL_OPTIONS", "DI_CIL_OWN_OPTIONS", "SYNTH_DEFAULTS", "SYNTH_EXEMPLAR_OPTIONS", "SYNTH_OPTIONS",
           "DeepInversionCIL", "SyntheticExemplars", "old_class_distillation"]

#: DeepInversion's settings that runs may give (the rest: its preset="auto" from the learner).
SYNTH_OPTIONS = frozenset({"synth_iterations", "synth_batch_size", "synth_lr", "bn_weight", "first_bn_multiplier"})
#: DeepInversion-CIL's own run options, declared here.
DI_CIL_OWN_OPTIONS = (
    StrategyOption("synth_per_class", int, 250, "deepinversion-cil: DeepInversion images per old class and task "
                                                "(default: 250, the paper's)"),
    StrategyOption("ce_classes", str, None, "deepinversion-cil: the new data's cross-entropy over every class seen "
                                            "(seen, Eq. 11) or over the task's own (new) (default: seen; new for "
                                            "deepinversion-cil-balanced)"),
    StrategyOption("head_epochs", int, None, "deepinversion-cil: epochs of class-balanced fine-tuning of the "
                                             "classifier alone on the new data and the synthetic images after each "
                                             "task (default: 0; 1 for deepinversion-cil-balanced)"),
    StrategyOption("synth_rounds", int, 1, "deepinversion-cil: rounds the old-class images of a task are made in, "
                                           "the first before the task, round k at epoch k * epochs // rounds, "
                                           "against the learner as it then is with competition_weight > 0 "
                                           "(default: 1, all before the task)"),
)
#: The run options DeepInversion-CIL reads: the class-incremental ones, DeepInversion's, the competition's and
#: its own.
DI_CIL_OPTIONS = CIL_OPTIONS | SYNTH_OPTIONS | {"competition_weight"} | {o.name for o in DI_CIL_OWN_OPTIONS}
_DI_CIL_READS = (*sorted(CIL_OPTIONS | SYNTH_OPTIONS | {"competition_weight"}), *DI_CIL_OWN_OPTIONS)
SYNTH_EXEMPLAR_OPTIONS = ICARL_OPTIONS | SYNTH_OPTIONS
#: The synthesis defaults of those strategies: DeepInversion's own (None), not ED's MNIST settings.
SYNTH_DEFAULTS = {**CIL_DEFAULTS, "synth_iterations": None, "synth_lr": None, "bn_weight": None,
                  "first_bn_multiplier": None, "ce_classes": "seen", "head_epochs": 0}


class _Synthesis:
    """DeepInversion of a frozen model for the strategies that replace old data by synthetic images: its
    settings (``synth_options`` go to :class:`~exml_fast.synth.DeepInversion`, whose ``preset="auto"``
    picks the rest from the teacher) and the call that makes ``per_class`` images of each class."""

    def _init_synthesis(self, *, input_shape, mean, std, synth_iterations: int | None,
                        synth_batch_size: int, synth_options: dict[str, Any] | None) -> None:
        owner = type(self).__name__
        if input_shape is None or len(tuple(input_shape)) != 3:
            raise ValueError(f"{owner}: input_shape (C, H, W) of the images is needed to synthesise them; got "
                             f"{input_shape!r}")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.synth_iterations = None if synth_iterations is None else check_int(synth_iterations,
                                                                               "synth_iterations", owner, low=1)
        self.synth_batch_size = check_int(synth_batch_size, "synth_batch_size", owner, low=1)
        self.synth_options = dict(synth_options or {})
        self.synth_stats: list[dict[str, float]] = []

    def history_info(self, i: int) -> dict[str, Any]:
        done = [st for st in self.synth_stats if st["experience"] == i]
        return {"synthesis": done} if done else {}

    def _synthesis_config(self) -> dict[str, Any]:
        return {"synth_iterations": self.synth_iterations, "synth_batch_size": self.synth_batch_size,
                "synth_options": self.synth_options, "input_shape": list(self.input_shape),
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}

    def _synthesize(self, teacher: nn.Module, classes: list[int], per_class: int, tag: str, i: int, *,
                    competitor: nn.Module | None = None, competition_weight: float = 0.0,
                    **stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` DeepInversion images of each of ``classes`` from the frozen ``teacher`` (CPU float32),
        seeded from (seed, tag, i); with a ``competitor``, Adaptive DeepInversion against it. ``stats``: extra
        entries of the synthesis record."""
        from exml_fast.synth import DeepInversion

        adaptive = {} if competitor is None else {"competitor": competitor, "competition_weight": competition_weight}
        synth = DeepInversion(teacher, input_shape=self.input_shape, mean=self.mean, std=self.std,
                              device=self._device(), **self.synth_options, **adaptive)
        batch = synth.synthesize(per_class * len(classes), classes=classes, iterations=self.synth_iterations,
                                 batch_size=self.synth_batch_size, generator=derive_seed(self.seed, tag, i),
                                 progress=self.progress, distributed=is_sharded(self.distributed))
        with torch.no_grad():
            agree = float((teacher(batch.x).argmax(1) == batch.y).float().mean())
        self.synth_stats.append({"experience": i, "images": int(batch.y.numel()), "teacher_agreement": agree,
                                 **stats})
        return batch.x.detach().to("cpu", torch.float32), batch.y.detach().cpu()


class DeepInversionCIL(_Synthesis, DataStrategy):
    """Data-free class-incremental learning with DeepInversion (Yin et al., §4.5): before each task after the
    first, the frozen previous model synthesises ``synth_per_class`` images of every old class; every training
    step takes a minibatch of new real data and one of the same size of those images, and minimises Eq. 11::

        KL(p_old(x̂) ‖ p(x̂)) + CE(y, p(x)) + KL(p_old(x | old) ‖ p(x | old))

    where ``p`` is the learner's softmax over the classes seen (old and new), ``p_old(x̂)`` the previous
    model's softmax over the old classes with zeros on the new ones (the fused
    :func:`exml_fast.ops.soft_target_cross_entropy`, which differs from that KL by a constant), and the last
    term the distillation of the old classes on the new data (:func:`exml_fast.ops.kd_loss`, τ 1: the paper
    gives none). The synthetic images are dropped after the task: no real image of an old task is kept.

    Two options counter the bias of that loss towards the new classes (Smith et al. 2021, "Always Be
    Dreaming", found the learner separating real from synthetic images: every real image is new, every
    synthetic one old). ``ce_classes="new"``: the cross-entropy of the new data runs over the new classes'
    logits only, so real images stop pushing the old classes' logits down. ``head_epochs``: after the task,
    the classifier (the last ``nn.Linear``) alone is fine-tuned on features of the new data and of the
    synthetic images (the rest of the network frozen, in eval mode), every minibatch holding the two in
    proportion to their classes, cross-entropy over all classes seen. Registered as
    ``deepinversion-cil-balanced`` with ``ce_classes="new", head_epochs=1``, chosen on a validation split
    (benches/results/cil_dicil_validation.md).

    Adaptive DeepInversion against the learner (§4.5's "ADI"): with ``synth_rounds`` R > 1 the images of each
    old class are made in R rounds of near-equal size, the first before the task and round k at the start of
    epoch ``k * epochs // R``; with ``competition_weight`` w > 0 the later rounds add DeepInversion's
    competition term ``w * (1 - JS(previous model, learner))`` against a frozen copy of the learner as it is
    then, so they seek old-class images the learner has started to get wrong. (Before the task the learner
    *is* the previous model and the term is zero, hence the rounds.) Training draws from every image made so
    far.

    Args:
        model: the learner (with BatchNorm layers, whose statistics DeepInversion matches).
        input_shape, mean, std: of the scenario's images (C, H, W) and their normalisation.
        synth_per_class: DeepInversion images per old class and task (the paper: 250).
        synth_iterations, synth_batch_size: DeepInversion's steps per batch (None: its default) and batch.
        synth_options: further :class:`~exml_fast.synth.DeepInversion` settings (e.g. ``lr``, ``bn_weight``).
        ce_classes: "seen" (Eq. 11: the new data's cross-entropy over every class seen) or "new" (over the
            task's own classes).
        head_epochs: passes of the balanced classifier fine-tuning after each task from the second, in
            minibatches of ``2 * batch_size`` (0: none, Eq. 11 alone).
        synth_rounds: rounds the old-class images of a task are made in (1: all before the task; at most
            ``epochs`` and ``synth_per_class``).
        competition_weight: weight of the competition against the learner in rounds after the first (0: plain
            DeepInversion; > 0 needs ``synth_rounds`` > 1).
        **kwargs: as :class:`DataStrategy`.
    """

    name = "deepinversion-cil"
    CE_CLASSES = ("seen", "new")
    #: runs recorded before these options existed were Eq. 11 with no head fine-tuning, all images made first
    config_added = {**DataStrategy.config_added, "ce_classes": "seen", "head_epochs": 0, "synth_rounds": 1,
                    "competition_weight": 0.0}

    def __init__(self, model: nn.Module, *, input_shape, mean=None, std=None, synth_per_class: int = 250,
                 synth_iterations: int | None = None, synth_batch_size: int = 256,
                 synth_options: dict[str, Any] | None = None, ce_classes: str = "seen", head_epochs: int = 0,
                 synth_rounds: int = 1, competition_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        owner = type(self).__name__
        self._init_synthesis(input_shape=input_shape, mean=mean, std=std, synth_iterations=synth_iterations,
                             synth_batch_size=synth_batch_size, synth_options=synth_options)
        self.synth_per_class = check_int(synth_per_class, "synth_per_class", owner, low=1)
        check_choice(ce_classes, "ce_classes", owner, self.CE_CLASSES)
        self.ce_classes = ce_classes
        self.head_epochs = check_int(head_epochs, "head_epochs", owner, low=0)
        self.synth_rounds = check_int(synth_rounds, "synth_rounds", owner, low=1)
        if self.synth_rounds > min(self.epochs, self.synth_per_class):
            raise ValueError(f"{owner}: synth_rounds must be at most epochs ({self.epochs}) and synth_per_class "
                             f"({self.synth_per_class}): one round starts an epoch and makes an image of each "
                             f"class at least; got {synth_rounds}")
        self.competition_weight = check_float(competition_weight, "competition_weight", owner)
        if self.competition_weight > 0 and self.synth_rounds == 1:
            raise ValueError(f"{owner}: competition_weight > 0 needs synth_rounds > 1: before the task the learner "
                             "is the previous model, so the competition against it is zero; got synth_rounds 1")
        self.prev: nn.Module | None = None
        self._old: torch.Tensor | None = None
        self._new: torch.Tensor | None = None
        self._synth_x: torch.Tensor | None = None
        self._synth_y: torch.Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self._synthesis_config(), "synth_per_class": self.synth_per_class,
                "ce_classes": self.ce_classes, "head_epochs": self.head_epochs, "synth_rounds": self.synth_rounds,
                "competition_weight": self.competition_weight}

    def _round_sizes(self) -> list[int]:
        """Images per old class in each round: near-equal, the larger first."""
        q, r = divmod(self.synth_per_class, self.synth_rounds)
        return [q + (k < r) for k in range(self.synth_rounds)]

    def before_experience(self, exp, i: int) -> None:
        if not self.experiences_seen:
            return
        old = self.freeze_previous()
        self._new = torch.tensor(sorted({int(c) for c in exp.classes}), dtype=torch.int64, device=self._device())
        extra = {} if self.synth_rounds == 1 else {"round": 0}
        self._synth_x, self._synth_y = self._synthesize(self.prev, old, self._round_sizes()[0], "deepinversion-cil",
                                                        i, **extra)

    def before_epoch(self, epoch: int, exp, i: int) -> None:
        if self.prev is None or self.synth_rounds == 1:
            return
        # rounds <= epochs, so each round has an epoch of its own
        k = next((k for k in range(1, self.synth_rounds) if k * self.epochs // self.synth_rounds == epoch), None)
        if k is None:
            return
        competitor = frozen_copy(self.model) if self.competition_weight > 0 else None
        x, y = self._synthesize(self.prev, self._old.tolist(), self._round_sizes()[k], f"deepinversion-cil-r{k}", i,
                                competitor=competitor, competition_weight=self.competition_weight, round=k)
        self._synth_x, self._synth_y = torch.cat([self._synth_x, x]), torch.cat([self._synth_y, y])

    def cleanup_experience(self) -> None:
        self.prev = self._old = self._new = self._synth_x = self._synth_y = None

    def fit(self, x: torch.Tensor, y: torch.Tensor, exp, i: int) -> float:
        loss = super().fit(x, y, exp, i)
        if self.prev is not None and self.head_epochs > 0:
            self._balance_head(x, y, exp, i)
        return loss

    def _balance_head(self, x: torch.Tensor, y: torch.Tensor, exp, i: int) -> None:
        """Fine-tunes the last ``nn.Linear`` alone on penultimate features of the new data and the synthetic
        images: minibatches of ``2 * batch_size``, the two parts in proportion to their classes, cross-entropy
        over the classes seen; SGD as training, draws seeded from (seed, "head", i)."""
        dev = self._device()
        head = classifier_layer(self.model)
        real = penultimate_features(self.model, x, normalize=False).to(dev)
        synth = penultimate_features(self.model, self._synth_x, normalize=False).to(dev)
        real_y, synth_y = y.to(dev), self._synth_y.to(dev)
        active = self.active_classes(exp)
        pos = torch.full((self.num_classes,), -1, dtype=torch.int64, device=dev)
        pos[active] = torch.arange(active.numel(), device=dev)
        size = 2 * self.batch_size
        n_real = min(size - 1, max(1, round(size * self._new.numel() / active.numel())))
        steps = self.head_epochs * -(-int(x.shape[0]) // self.batch_size)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "head", i))
        opt = torch.optim.SGD(head.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        for _ in range(steps):
            ir = torch.randint(0, real.shape[0], (n_real,), generator=gen).to(dev)
            isy = torch.randint(0, synth.shape[0], (size - n_real,), generator=gen).to(dev)
            logits = head(torch.cat([real[ir], synth[isy]])).index_select(1, active)
            loss = F.cross_entropy(logits, pos[torch.cat([real_y[ir], synth_y[isy]])])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def trained_models(self):
        return (self.model, self.prev)

    def step_loss(self, xb, yb, step):
        if self.prev is None:  # the first task: cross-entropy on its data
            return super().step_loss(xb, yb, step)
        gen, dev = step.generator, self._device()
        lo, total = step.rows or (0, xb.shape[0])
        idx = torch.randint(0, self._synth_x.shape[0], (total,), generator=gen)[lo : lo + xb.shape[0]]
        xs = self._synth_x[idx].to(dev, non_blocking=True)
        if self.augment and (self.pad_crop or self.flip):
            xs = augment_batch(xs, gen, pad_crop=self.pad_crop, flip=self.flip, fill=self._fill(),
                               within=(lo, total))
        both = torch.cat([xb, xs])
        logits = step.forward(both).index_select(1, step.active)
        with torch.no_grad():
            old_logits = self.prev(both).index_select(1, self._old)
        n = xb.shape[0]
        pos_old = step.pos[self._old]
        synth_term, kd = old_class_distillation(logits, old_logits, n_real=n, pos_old=pos_old)
        if self.ce_classes == "new":  # over the task's own columns: yb's rank among the new classes
            ce = F.cross_entropy(logits[:n].index_select(1, step.pos[self._new]),
                                 torch.searchsorted(self._new, yb))
        else:
            ce = F.cross_entropy(logits[:n], step.pos[yb])
        return synth_term + ce + kd


def old_class_distillation(logits: torch.Tensor, old_logits: torch.Tensor, *, n_real: int,
                           pos_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two distillation terms of DeepInversion-CIL's Eq. 11 on a minibatch of real rows followed by
    synthetic ones: ``KL(p_old(x̂) ‖ p(x̂))`` on the synthetic rows (the previous model's softmax over the old
    classes as the target, zeros on the other columns: the fused
    :func:`exml_fast.ops.soft_target_cross_entropy`, which differs from that KL by a constant) and
    ``KL(p_old(x | old) ‖ p(x | old))`` on the real rows (:func:`exml_fast.ops.kd_loss`, τ 1).

    Args:
        logits: (B, A) the learner's logits over the active classes (the classes seen, the new ones included);
            rows ``[:n_real]`` are real data, the others synthetic images of the old classes.
        old_logits: (B, O) the previous model's logits over the O old classes, same rows.
        n_real: the number of real rows (0 <= n_real < B).
        pos_old: (O,) int64, the column of each old class among the A active ones.

    Returns:
        (synthetic term, real-data term), two scalars (means over their rows).
    """
    from exml_fast.ops import kd_loss, soft_target_cross_entropy

    n = int(n_real)
    target = torch.zeros_like(logits[n:])
    target[:, pos_old] = torch.softmax(old_logits[n:], 1).to(logits.dtype)
    synth_term = soft_target_cross_entropy(logits[n:], target)
    kd = kd_loss(logits[:n].index_select(1, pos_old), old_logits[:n].contiguous(), temperature=1.0)
    return synth_term, kd


class SyntheticExemplars(_Synthesis, ICaRL):
    """iCaRL with every exemplar replaced by a DeepInversion image of its class (the incremental-learning
    report's §5.2, from noise): after each task, the model just trained (frozen) synthesises ``m = K // classes``
    images of each new class, which become that class's exemplars; training, distillation and the
    nearest-mean classifier are iCaRL's. No real image of a past task is kept.

    Args:
        model, memory_size, classifier: as :class:`ICaRL`.
        input_shape, mean, std, synth_iterations, synth_batch_size, synth_options: as
            :class:`DeepInversionCIL`.
        **kwargs: as :class:`DataStrategy`.
    """

    name = "synthetic-exemplars"
    keeps_data = False
    exemplars_from_data = False  # synthesised by the model, whatever images the task had

    def __init__(self, model: nn.Module, *, input_shape, mean=None, std=None, synth_iterations: int | None = None,
                 synth_batch_size: int = 256, synth_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._init_synthesis(input_shape=input_shape, mean=mean, std=std, synth_iterations=synth_iterations,
                             synth_batch_size=synth_batch_size, synth_options=synth_options)

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self._synthesis_config()}

    def _add_exemplars(self, exp, new, m):
        """Stores ``m`` DeepInversion images of each class of ``new``, synthesised by the model just trained
        (frozen); the experience's own images are not used."""
        teacher = frozen_copy(self.model)
        sx, sy = self._synthesize(teacher, new, m, "synthetic-exemplars", self.experiences_seen + 1)
        for c in new:
            self.memory.add(c, sx[sy == c])


def _synthesis(ctx: BuildContext, opt: dict[str, Any], owner: str) -> dict[str, Any]:
    sc = ctx.scenario
    if opt["synth_lr"] is not None:  # refused here under the name the user gave, not DeepInversion's "lr"
        check_float(opt["synth_lr"], "synth_lr", owner, positive=True)
    options = {k: opt[o] for k, o in (("lr", "synth_lr"), ("bn_weight", "bn_weight"),
                                      ("first_bn_multiplier", "first_bn_multiplier")) if opt[o] is not None}
    return {"input_shape": sc.input_shape, "mean": sc.mean, "std": sc.std,
            "synth_iterations": opt["synth_iterations"], "synth_batch_size": opt["synth_batch_size"],
            "synth_options": options}


@register_strategy("deepinversion-cil", keeps_data=False, data=True, defaults=SYNTH_DEFAULTS,
                   options=_DI_CIL_READS,
                   help="class-incremental: DeepInversion images of the old classes from the previous model, "
                        "mixed with the new data (no real old image kept)")
def _deepinversion_cil(ctx: BuildContext, opt: dict[str, Any]) -> DeepInversionCIL:
    return DeepInversionCIL(build_data_learner(ctx, opt), synth_per_class=opt["synth_per_class"],
                            ce_classes=opt["ce_classes"], head_epochs=opt["head_epochs"],
                            synth_rounds=opt["synth_rounds"], competition_weight=opt["competition_weight"],
                            **_synthesis(ctx, opt, "deepinversion-cil"),
                            **data_strategy_kwargs(ctx, opt))


@register_strategy("deepinversion-cil-balanced", keeps_data=False, data=True,
                   defaults={**SYNTH_DEFAULTS, "ce_classes": "new", "head_epochs": 1}, options=_DI_CIL_READS,
                   help="class-incremental: deepinversion-cil with the new data's cross-entropy over the new classes "
                        "and a class-balanced classifier fine-tuning after each task (no real old image kept)")
def _deepinversion_cil_balanced(ctx: BuildContext, opt: dict[str, Any]) -> DeepInversionCIL:
    strategy = _deepinversion_cil(ctx, opt)
    strategy.name = "deepinversion-cil-balanced"  # its results and tables carry the name it was run under
    return strategy


@register_strategy("synthetic-exemplars", keeps_data=False, data=True, defaults=SYNTH_DEFAULTS,
                   options=SYNTH_EXEMPLAR_OPTIONS,
                   help="class-incremental: iCaRL with DeepInversion images as exemplars (no real image kept)")
def _synthetic_exemplars(ctx: BuildContext, opt: dict[str, Any]) -> SyntheticExemplars:
    return SyntheticExemplars(build_data_learner(ctx, opt), memory_size=opt["memory_size"],
                              classifier=opt["classifier"], **_synthesis(ctx, opt, "synthetic-exemplars"),
                              **data_strategy_kwargs(ctx, opt))
