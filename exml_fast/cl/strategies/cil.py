"""Class-incremental learning from data (REFERENCE.md §4): each experience brings the training data of its
classes, and only while it is learned. :class:`FineTune` (the lower bound), :class:`LwF`,
:class:`DeepInversionCIL` and :class:`SyntheticExemplars` keep nothing of it (the last two replace old data
by DeepInversion images); :class:`ICaRL` keeps K real exemplars and :class:`Joint` (the upper bound) all of
it.

Every strategy here trains one learner in place with SGD over the experience's training set for ``epochs``
(the experts' recipe by default: lr 0.01, momentum 0.9, weight decay 5e-4, batch 32), one head and no task
label. Its classification term (the softmax forms; iCaRL's sigmoids likewise) runs over the **active**
units, the classes seen so far (those of earlier experiences and the current one): the usual
class-incremental protocol (van de Ven et al.; PyCIL grows its head instead, which is the same), and
:meth:`predict` answers among the active units only.

The experience passed to :meth:`DataStrategy.train` is a :class:`~exml_fast.cl.scenarios.Experience`
(anything with ``index``, ``classes``, ``task_id``, ``train_x`` and ``train_y``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast._utils.batches import minibatch_bounds
from exml_fast._utils.dist import is_sharded
from exml_fast._utils.progress import Progress, RunningLoss
from exml_fast.cl.parallel import ShardedSteps
from exml_fast.cl.exemplars import (ExemplarMemory, class_means, classifier_layer, herding, nearest_mean_logits,
                                    penultimate_features)
from exml_fast.cl.strategies.base import Strategy, check_float, check_int, derive_seed, frozen_copy
from exml_fast.cl.strategies.registry import BuildContext, build_data_learner, register_strategy
from exml_fast.models.features import FeatureTap
from exml_fast.models.generators import GENERATOR_ARCHS
from exml_fast.ops.fast_layers import fast_layers
from exml_fast.synth.generative import GenerativeSynthesizer
from exml_fast.synth.generative_losses import feature_cosine_discrepancy
from exml_fast.training import augment_batch

__all__ = ["ICARL_CLASSIFIERS", "LWF_FORMS", "DataStrategy", "DeepInversionCIL", "FineTune", "ICaRL", "Joint", "LwF",
           "SKDCIL", "SyntheticExemplars"]

#: LwF's loss forms: "softmax" (Li & Hoiem: cross-entropy on the active units, KD on the old units' softened
#: softmax) and "mc" (LwF.MC, iCaRL's form: binary cross-entropy with sigmoids on every active unit, summed
#: over them, the old units' targets the previous model's sigmoids).
LWF_FORMS = ("softmax", "mc")
#: iCaRL's classifiers: the nearest mean of exemplars, or the network's outputs.
ICARL_CLASSIFIERS = ("nme", "cnn")


class DataStrategy(Strategy):
    """Base of the strategies that learn from data experiences: trains ``model`` for ``epochs`` over each
    experience's training set (as returned by :meth:`_train_set`) on the loss of :meth:`_loss`.

    Args:
        model: the learner, (B, C, H, W) → (B, num_classes) logits; trained in place on ``device``.
        num_classes: the learner's outputs (default: the model's last ``nn.Linear``'s ``out_features``).
        epochs: passes over each experience's training set.
        lr, momentum, weight_decay, batch_size: SGD (a fresh optimiser per experience).
        lr_milestones: epochs (increasing, each in [1, epochs)) after which the lr is divided by 10, for every
            experience (SKD's schedule: 80 and 120 of 160 epochs from lr 0.1); empty: a constant lr.
        augment, pad_crop, flip: per-sample pad-crop (and flip) augmentation of each minibatch
            (:func:`exml_fast.training.augment_batch`); off by default, as the experts' recipe.
        seed: minibatch order and augmentation of experience i are drawn from (seed, i), so a run resumed
            after experience i equals an uninterrupted one.
        device: where the learner trains (None: the model's device).
        progress: a progress bar per experience.
    """

    name = "data"
    #: these strategies see the real data of the current experience: never ex-model
    ex_model = False
    learns_from = "data"
    config_added = {"lr_milestones": []}

    def __init__(self, model: nn.Module, *, num_classes: int | None = None, epochs: int = 20, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 32, augment: bool = False,
                 pad_crop: int = 4, flip: bool = False, lr_milestones=(), seed: int = 0,
                 device: torch.device | str | None = None, progress: bool = True) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module; got {type(model).__name__}")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else "cpu"
        if num_classes is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"{owner}: num_classes is needed (the model has no nn.Linear to read it from)")
            num_classes = linears[-1].out_features
        super().__init__(num_classes=num_classes, device=device, seed=seed, progress=progress)
        self.model = model.to(self.device)
        self.epochs = check_int(epochs, "epochs", owner, low=1)
        self.lr = check_float(lr, "lr", owner, positive=True)
        self.lr_milestones = _milestones(lr_milestones, self.epochs, owner)
        self.momentum = check_float(momentum, "momentum", owner)
        self.weight_decay = check_float(weight_decay, "weight_decay", owner)
        self.batch_size = check_int(batch_size, "batch_size", owner, low=1)
        self.augment = bool(augment)
        self.pad_crop = check_int(pad_crop, "pad_crop", owner, low=0)
        self.flip = bool(flip)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "keeps_data": self.keeps_data, "epochs": self.epochs, "lr": self.lr,
                "momentum": self.momentum, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                "augment": self.augment, "pad_crop": self.pad_crop, "flip": self.flip,
                "lr_milestones": list(self.lr_milestones)}

    # -- checks ------------------------------------------------------------------------------------------
    def _check_experience(self, exp) -> None:
        owner = type(self).__name__
        for attr in ("index", "classes", "task_id", "train_x", "train_y"):
            if not hasattr(exp, attr):
                raise TypeError(f"{owner}.train: experience must be an exml_fast.cl.scenarios.Experience (with "
                                f"training data); got {type(exp).__name__}")
        if exp.task_id is not None:
            raise ValueError(f"{owner}.train: class-incremental strategies take experiences without task labels; "
                             f"experience {exp.index} has task_id={exp.task_id!r}")
        classes = tuple(int(c) for c in exp.classes)
        if not classes or any(not 0 <= c < self.num_classes for c in classes):
            raise ValueError(f"{owner}.train: experience classes must be a non-empty subset of "
                             f"[0, {self.num_classes}); got {list(classes)}")
        x, y = exp.train_x, exp.train_y
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"{owner}.train: experience {exp.index}: train_x must be a floating (N, C, H, W) "
                             f"tensor; got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(f"{owner}.train: experience {exp.index}: train_y must be int64 of shape "
                             f"({x.shape[0]},); got {getattr(y, 'dtype', type(y).__name__)} "
                             f"{tuple(getattr(y, 'shape', ()))}")
        if x.shape[0] == 0:
            raise ValueError(f"{owner}.train: experience {exp.index} has no training data")
        outside = set(torch.unique(y).tolist()) - set(classes)
        if outside:
            raise ValueError(f"{owner}.train: experience {exp.index}: train_y holds classes {sorted(outside)} "
                             f"outside its classes {list(classes)}")

    # -- training ----------------------------------------------------------------------------------------
    def train(self, experience) -> None:
        """Learns one experience from its training data; keeps none of it unless :attr:`keeps_data`."""
        self._check_experience(experience)
        i = self.experiences_seen + 1
        t0 = time.perf_counter()
        x, y = self._train_set(experience)
        self._begin(experience, i)
        try:
            loss = self._fit(x, y, experience, i)
        finally:
            self._end()
        self._learned(experience, x, y)
        del x, y
        self._record(experience, train_size=int(experience.train_y.shape[0]), final_loss=loss,
                     train_s=round(time.perf_counter() - t0, 3), **self._record_info(i))

    def _record_info(self, i: int) -> dict[str, Any]:
        """Extras for experience i's history entry (the synthesising strategies: their synthesis)."""
        return {}

    def _train_set(self, exp) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) to train on for this experience (the experience's own data; Joint adds its memory)."""
        return exp.train_x, exp.train_y

    def _begin(self, exp, i: int) -> None:
        """Before experience i's training (LwF freezes the previous model here)."""

    def _learned(self, exp, x: torch.Tensor, y: torch.Tensor) -> None:
        """After the experience's training succeeded, with the set it trained on (Joint keeps it here; iCaRL
        selects exemplars)."""

    def _end(self) -> None:
        """After experience i's training, also after an error (LwF drops the previous model here)."""

    def _epoch_begin(self, epoch: int, exp, i: int) -> None:
        """At the start of each training epoch (0-based) of experience i, the learner in train mode
        (DeepInversion-CIL synthesises its later rounds here)."""

    def _freeze_previous(self) -> list[int]:
        """Before a task after the first: a frozen copy of the learner becomes ``self.prev`` and ``self._old`` the
        classes seen so far (on the device); returns those classes."""
        self.prev = frozen_copy(self.model)
        old = list(self.classes_seen)
        self._old = torch.tensor(old, dtype=torch.int64, device=self._device())
        return old

    def _active(self, exp) -> torch.Tensor:
        """The classes seen so far, this experience's included (sorted, on the device)."""
        seen = sorted(set(self.classes_seen) | {int(c) for c in exp.classes})
        return torch.tensor(seen, dtype=torch.int64, device=self._device())

    def _loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy over the active units (``ctx["active"]``; ``ctx["pos"]`` maps a class to its column)."""
        return F.cross_entropy(logits.index_select(1, ctx["active"]), ctx["pos"][y])

    def _step_loss(self, xb: torch.Tensor, yb: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """One minibatch's loss, a mean over its rows (DeepInversion-CIL adds synthetic images of the old
        classes here). The learner's forward is ``ctx["forward"]`` (DDP under torchrun); ``xb`` holds rows
        ``lo...`` of a minibatch of ``n`` (``ctx["rows"] = (lo, n)``): draws for the minibatch are made for
        all ``n`` rows, and this rank's taken."""
        return self._loss(ctx.get("forward", self.model)(xb), xb, yb, ctx)

    def _models(self) -> tuple[nn.Module | None, ...]:
        """The models whose pooling layers take the fused window_pool during training."""
        return (self.model,)

    def _fill(self) -> float:
        return 0.0

    def _fit(self, x: torch.Tensor, y: torch.Tensor, exp, i: int) -> float:
        dev = self._device()
        active = self._active(exp)
        pos = torch.full((self.num_classes,), -1, dtype=torch.int64, device=dev)
        pos[active] = torch.arange(active.numel(), device=dev)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "train", i))
        # Under torchrun: DDP over the ranks, each on its share of every minibatch (exml_fast.cl.parallel).
        steps = ShardedSteps(self)
        # ctx["forward"]: the learner to train through; ctx["rows"]: (lo, n), the minibatch of this step
        # holds n rows, of which this rank has rows lo... (all of them in one process).
        ctx = {"active": active, "pos": pos, "experience": i, "generator": gen, "forward": steps.forward}
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        bounds = minibatch_bounds(int(x.shape[0]), self.batch_size)
        total = self.epochs * len(bounds)
        bar = Progress(total, f"train {i}", self.progress and steps.rank == 0)
        running = RunningLoss(bar, total, dev, reduce=steps.mean_over_ranks if steps.sharded else None)
        self.model.train()
        with fast_layers(*self._models()):
            try:
                for epoch in range(self.epochs):
                    self._epoch_begin(epoch, exp, i)
                    lr = self.lr * 0.1 ** sum(epoch >= m for m in self.lr_milestones)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    perm = torch.randperm(int(x.shape[0]), generator=gen)
                    for start, end in bounds:
                        lo, hi, scale = steps.rows(end - start)
                        idx = perm[start + lo : start + hi]
                        xb = x[idx].to(dev, non_blocking=True)
                        yb = y[idx].to(dev, non_blocking=True)
                        ctx["rows"] = (lo, end - start)
                        if self.augment and (self.pad_crop or self.flip):
                            xb = augment_batch(xb, gen, pad_crop=self.pad_crop, flip=self.flip, fill=self._fill(),
                                               within=ctx["rows"])
                        loss = steps.scaled(self._step_loss(xb, yb, ctx), scale)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        running.add(loss)
                running.flush()
            finally:
                bar.close()
                steps.finish()
                self.model.eval()
        return running.last

    @torch.no_grad()
    def _logits(self, x, task_ids):
        self.model.eval()
        out = self.model(x)
        seen = torch.tensor(self.classes_seen, dtype=torch.int64, device=out.device)
        mask = torch.ones(out.shape[1], dtype=torch.bool, device=out.device)
        mask[seen] = False
        return out.masked_fill(mask, float("-inf"))  # one head over the classes seen

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.model.load_state_dict(state["model"])


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

    def _train_set(self, exp):
        x, y = exp.train_x.detach().cpu(), exp.train_y.detach().cpu()
        if self.memory_x is not None:
            if self.memory_x.shape[1:] != x.shape[1:]:
                raise ValueError(f"Joint.train: experience {exp.index}'s images are {tuple(x.shape[1:])}, the "
                                 f"earlier ones {tuple(self.memory_x.shape[1:])}")
            x, y = torch.cat([self.memory_x, x]), torch.cat([self.memory_y, y])
        return x, y

    def _learned(self, exp, x, y):
        self.memory_x, self.memory_y = x, y  # only once the task is learned: a failed task adds nothing

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory_x": self.memory_x, "memory_y": self.memory_y}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory_x, self.memory_y = state["memory_x"], state["memory_y"]


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

    def _begin(self, exp, i: int) -> None:
        self.prev = frozen_copy(self.model) if self.experiences_seen else None
        self._old = torch.tensor(self.classes_seen, dtype=torch.int64, device=self._device())

    def _end(self) -> None:
        self.prev = None

    def _models(self):
        return (self.model, self.prev)

    def _loss(self, logits, x, y, ctx):
        active, pos, t = ctx["active"], ctx["pos"], ctx["experience"]
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

    def _train_set(self, exp):
        x, y = exp.train_x, exp.train_y
        if len(self.memory):
            mx, my = self.memory.tensors()
            x, y = torch.cat([x.detach().cpu(), mx]), torch.cat([y.detach().cpu(), my])
        return x, y

    def _learned(self, exp, x, y):
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
    def _logits(self, x, task_ids):
        if self.classifier == "cnn" or self.means is None:
            return super()._logits(x, task_ids)
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

    def _record_info(self, i: int) -> dict[str, Any]:
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

    def _begin(self, exp, i: int) -> None:
        if not self.experiences_seen:
            return
        old = self._freeze_previous()
        self._new = torch.tensor(sorted({int(c) for c in exp.classes}), dtype=torch.int64, device=self._device())
        extra = {} if self.synth_rounds == 1 else {"round": 0}
        self._synth_x, self._synth_y = self._synthesize(self.prev, old, self._round_sizes()[0], "deepinversion-cil",
                                                        i, **extra)

    def _epoch_begin(self, epoch: int, exp, i: int) -> None:
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

    def _end(self) -> None:
        self.prev = self._old = self._new = self._synth_x = self._synth_y = None

    def _fit(self, x: torch.Tensor, y: torch.Tensor, exp, i: int) -> float:
        loss = super()._fit(x, y, exp, i)
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
        active = self._active(exp)
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

    def _models(self):
        return (self.model, self.prev)

    def _step_loss(self, xb, yb, ctx):
        if self.prev is None:  # the first task: cross-entropy on its data
            return super()._step_loss(xb, yb, ctx)
        from exml_fast.ops import kd_loss, soft_target_cross_entropy

        gen, dev = ctx["generator"], self._device()
        lo, total = ctx.get("rows", (0, xb.shape[0]))
        idx = torch.randint(0, self._synth_x.shape[0], (total,), generator=gen)[lo : lo + xb.shape[0]]
        xs = self._synth_x[idx].to(dev, non_blocking=True)
        if self.augment and (self.pad_crop or self.flip):
            xs = augment_batch(xs, gen, pad_crop=self.pad_crop, flip=self.flip, fill=self._fill(),
                               within=(lo, total))
        both = torch.cat([xb, xs])
        logits = ctx.get("forward", self.model)(both).index_select(1, ctx["active"])
        with torch.no_grad():
            old_logits = self.prev(both).index_select(1, self._old)
        n = xb.shape[0]
        pos_old = ctx["pos"][self._old]
        # KL(p_old(x̂) || p(x̂)): p_old's old-class softmax, zeros on the new classes' columns
        target = torch.zeros_like(logits[n:])
        target[:, pos_old] = torch.softmax(old_logits[n:], 1).to(logits.dtype)
        synth_term = soft_target_cross_entropy(logits[n:], target)
        if self.ce_classes == "new":  # over the task's own columns: yb's rank among the new classes
            ce = F.cross_entropy(logits[:n].index_select(1, ctx["pos"][self._new]),
                                 torch.searchsorted(self._new, yb))
        else:
            ce = F.cross_entropy(logits[:n], ctx["pos"][yb])
        kd = kd_loss(logits[:n].index_select(1, pos_old), old_logits[:n].contiguous(), temperature=1.0)
        return synth_term + ce + kd

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


# -- the command-line names ------------------------------------------------------------------------------


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

    def _begin(self, exp, i: int) -> None:
        if not self.experiences_seen:
            return
        old = self._freeze_previous()
        seen = len(set(old) | {int(c) for c in exp.classes})
        self._gamma = self.beta / (self.num_tasks * seen)
        self._synth = self._synthesizer(self.prev)
        t0 = time.perf_counter()
        result = self._synth.fit(self.delegator_iterations, batch_size=self.delegator_batch_size,
                                 generator=derive_seed(self.seed, "skd", i), progress=self.progress)
        self.delegator = self._synth.delegator
        last = {k: v[-1] for k, v in result.history.items() if v}
        self.delegator_stats.append({"experience": i, "fit_s": round(time.perf_counter() - t0, 3), **last})

    def _end(self) -> None:
        self.prev = self._synth = self._old = None

    def _record_info(self, i: int) -> dict[str, Any]:
        done = [st for st in self.delegator_stats if st["experience"] == i]
        return {"delegator": done} if done else {}

    def _models(self):
        return (self.model, self.prev)

    def _step_loss(self, xb, yb, ctx):
        if self.prev is None:
            return super()._step_loss(xb, yb, ctx)
        gen = ctx["generator"]
        lo, total = ctx.get("rows", (0, xb.shape[0]))
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
            logits = ctx.get("forward", self.model)(both).index_select(1, ctx["active"])
            s_feat = s_tap.features
        ce = F.cross_entropy(logits, ctx["pos"][torch.cat([yb, ys])])
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


def _milestones(value, epochs: int, owner: str) -> tuple[int, ...]:
    """``value`` (None, or numbers) as increasing whole epochs in [1, epochs), else a ValueError naming it."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (int, float)) else list(value)
    ok = all(not isinstance(v, bool) and isinstance(v, (int, float)) and float(v).is_integer() for v in items)
    out = tuple(int(v) for v in items) if ok else ()
    if not ok or any(not 1 <= v < epochs for v in out) or list(out) != sorted(set(out)):
        raise ValueError(f"{owner}: lr_milestones must be increasing whole epochs in [1, epochs={epochs}); "
                         f"got {value!r}")
    return out


def _common(ctx: BuildContext, opt: dict[str, Any]) -> dict[str, Any]:
    from exml_fast.cl.scenarios import default_expert_epochs

    epochs = opt["epochs"] if opt["epochs"] is not None else default_expert_epochs(ctx.scenario)
    return {"num_classes": ctx.scenario.num_classes, "epochs": epochs, "lr": opt["lr"],
            "momentum": opt["momentum"], "weight_decay": opt["weight_decay"], "batch_size": opt["batch_size"],
            "augment": opt["augment"], "flip": opt["flip"], "lr_milestones": opt["lr_milestones"],
            "seed": ctx.seed, "device": ctx.device,
            "progress": ctx.progress}


#: What the class-incremental strategies take over the run options' defaults: the experts' training recipe
#: (exml_fast.cl.scenarios.train_experts: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 32, no
#: augmentation); ``epochs`` None is the experts' epochs for the scenario (20 on Split MNIST).
CIL_DEFAULTS: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32,
                                "augment": False, "epochs": None}
#: The run options every class-incremental strategy reads, and LwF's own.
CIL_OPTIONS = frozenset({"epochs", "arch", "lr", "momentum", "weight_decay", "batch_size", "augment", "flip",
                         "lr_milestones"})
LWF_OPTIONS = CIL_OPTIONS | {"distill_temperature", "distill_weight", "distill_by_task", "lwf_form"}
ICARL_OPTIONS = CIL_OPTIONS | {"memory_size", "classifier"}
#: DeepInversion's settings that runs may give (the rest: its preset="auto" from the learner).
SYNTH_OPTIONS = frozenset({"synth_iterations", "synth_batch_size", "synth_lr", "bn_weight", "first_bn_multiplier"})
DI_CIL_OPTIONS = CIL_OPTIONS | SYNTH_OPTIONS | {"synth_per_class", "ce_classes", "head_epochs", "synth_rounds",
                                               "competition_weight"}
SYNTH_EXEMPLAR_OPTIONS = ICARL_OPTIONS | SYNTH_OPTIONS
#: The synthesis defaults of those strategies: DeepInversion's own (None), not ED's MNIST settings.
SYNTH_DEFAULTS = {**CIL_DEFAULTS, "synth_iterations": None, "synth_lr": None, "bn_weight": None,
                  "first_bn_multiplier": None, "ce_classes": "seen", "head_epochs": 0}


@register_strategy("finetune", keeps_data=False, data=True, defaults=CIL_DEFAULTS, options=CIL_OPTIONS,
                   help="class-incremental: fine-tune on each task's data (the lower bound)")
def _finetune(ctx: BuildContext, opt: dict[str, Any]) -> FineTune:
    return FineTune(build_data_learner(ctx, opt), **_common(ctx, opt))


@register_strategy("joint", keeps_data=True, data=True, defaults=CIL_DEFAULTS, options=CIL_OPTIONS,
                   help="class-incremental: train on all data seen so far (keeps it; the upper bound)")
def _joint(ctx: BuildContext, opt: dict[str, Any]) -> Joint:
    return Joint(build_data_learner(ctx, opt), **_common(ctx, opt))


@register_strategy("lwf", keeps_data=False, data=True, defaults=CIL_DEFAULTS, options=LWF_OPTIONS,
                   help="class-incremental: Learning without Forgetting (distil the previous model's old classes)")
def _lwf(ctx: BuildContext, opt: dict[str, Any]) -> LwF:
    return LwF(build_data_learner(ctx, opt), temperature=opt["distill_temperature"],
               distill_weight=opt["distill_weight"], by_task=opt["distill_by_task"], form=opt["lwf_form"],
               **_common(ctx, opt))


@register_strategy("icarl", keeps_data=True, data=True, defaults=CIL_DEFAULTS, options=ICARL_OPTIONS,
                   help="class-incremental: iCaRL (herding exemplars of real images, BCE + distillation, nearest "
                        "mean of exemplars; keeps K real images)")
def _icarl(ctx: BuildContext, opt: dict[str, Any]) -> ICaRL:
    return ICaRL(build_data_learner(ctx, opt), memory_size=opt["memory_size"], classifier=opt["classifier"],
                 **_common(ctx, opt))


def _synthesis(ctx: BuildContext, opt: dict[str, Any], owner: str) -> dict[str, Any]:
    sc = ctx.scenario
    if opt["synth_lr"] is not None:  # refused here under the name the user gave, not DeepInversion's "lr"
        check_float(opt["synth_lr"], "synth_lr", owner, positive=True)
    options = {k: opt[o] for k, o in (("lr", "synth_lr"), ("bn_weight", "bn_weight"),
                                      ("first_bn_multiplier", "first_bn_multiplier")) if opt[o] is not None}
    return {"input_shape": sc.input_shape, "mean": sc.mean, "std": sc.std,
            "synth_iterations": opt["synth_iterations"], "synth_batch_size": opt["synth_batch_size"],
            "synth_options": options}


@register_strategy("deepinversion-cil", keeps_data=False, data=True, defaults=SYNTH_DEFAULTS, options=DI_CIL_OPTIONS,
                   help="class-incremental: DeepInversion images of the old classes from the previous model, "
                        "mixed with the new data (no real old image kept)")
def _deepinversion_cil(ctx: BuildContext, opt: dict[str, Any]) -> DeepInversionCIL:
    return DeepInversionCIL(build_data_learner(ctx, opt), synth_per_class=opt["synth_per_class"],
                            ce_classes=opt["ce_classes"], head_epochs=opt["head_epochs"],
                            synth_rounds=opt["synth_rounds"], competition_weight=opt["competition_weight"],
                            **_synthesis(ctx, opt, "deepinversion-cil"),
                            **_common(ctx, opt))


@register_strategy("deepinversion-cil-balanced", keeps_data=False, data=True,
                   defaults={**SYNTH_DEFAULTS, "ce_classes": "new", "head_epochs": 1}, options=DI_CIL_OPTIONS,
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
                              **_common(ctx, opt))


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
                  delegator_options={"generator_arch": arch}, **_common(ctx, opt))
