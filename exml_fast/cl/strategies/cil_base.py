"""The base of the class-incremental strategies (REFERENCE.md §4): :class:`DataStrategy` trains one learner on
each experience's training data, and the run options every one of them reads.

Each experience brings the training data of its classes, and only while it is learned. Every strategy on this
base trains one learner in place with SGD over the experience's training set for ``epochs`` (the experts' recipe
by default: lr 0.01, momentum 0.9, weight decay 5e-4, batch 32), one head and no task label. Its classification
term (the softmax forms; iCaRL's sigmoids likewise) runs over the **active** units, the classes seen so far
(those of earlier experiences and the current one): the usual class-incremental protocol (van de Ven et al.;
PyCIL grows its head instead, which is the same), and :meth:`~DataStrategy.predict` answers among the active
units only.

The experience passed to :meth:`DataStrategy.train` is a :class:`~exml_fast.cl.scenarios.Experience`
(anything with ``index``, ``classes``, ``task_id``, ``train_x`` and ``train_y``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.batches import minibatch_bounds
from exml_fast._utils.progress import Progress, RunningLoss
from exml_fast.cl.parallel import ShardedSteps
from exml_fast.cl.strategies.base import Strategy, check_float, check_int, derive_seed, frozen_copy
from exml_fast.cl.strategies.registry import BuildContext
from exml_fast.ops.fast_layers import fast_layers
from exml_fast.training import augment_batch

__all__ = ["CIL_DEFAULTS", "CIL_OPTIONS", "DataStrategy", "TrainStep", "data_strategy_kwargs"]


@dataclass
class TrainStep:
    """What :meth:`DataStrategy.step_loss` and :meth:`DataStrategy.criterion` know of the step they compute.

    Attributes:
        active: (A,) int64, the classes seen so far, this experience's included (sorted, on the device): the
            units the classification term runs over.
        pos: (num_classes,) int64, the column of each class among ``active`` (-1 for the others):
            ``logits.index_select(1, active)`` has class ``c`` in column ``pos[c]``.
        experience: the 1-based index of the experience being learned.
        generator: the CPU ``torch.Generator`` of the experience's draws (minibatch order, augmentation): draw
            from it to stay reproducible and resumable.
        forward: the learner to call in training (``model`` itself, or its DDP wrapper under torchrun).
        rows: (lo, n): the minibatch holds ``n`` rows, of which ``xb`` is rows ``lo...`` (all of them in one
            process; None: all of ``xb``); draws for the minibatch are made for all ``n`` rows and this rank's taken.

    Item access (``step["active"]``) reads the same fields, for hooks written when this was a dict.
    """

    active: torch.Tensor
    pos: torch.Tensor
    experience: int
    generator: torch.Generator
    forward: Callable[[torch.Tensor], torch.Tensor]
    rows: tuple[int, int] | None = None

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


class DataStrategy(Strategy):
    """Base of the strategies that learn from data experiences: trains ``model`` for ``epochs`` over each
    experience's training set with SGD. A new strategy overrides some of its public hooks, in the order
    :meth:`train` calls them for experience ``i`` (1-based):

    1. :meth:`train_set` ``(exp) -> (x, y)`` — the set to train on (Joint and iCaRL add their memory).
    2. :meth:`before_experience` ``(exp, i)`` — e.g. freeze the previous model (:meth:`freeze_previous`).
    3. :meth:`fit` ``(x, y, exp, i) -> loss`` — the training loop; it calls, per epoch,
       :meth:`before_epoch` ``(epoch, exp, i)`` and, per minibatch, :meth:`step_loss` ``(xb, yb, step)``,
       whose default is :meth:`criterion` ``(step.forward(xb), xb, yb, step)`` (``step``: a
       :class:`TrainStep`). :meth:`trained_models` names the networks the loop runs (fused pooling).
    4. :meth:`cleanup_experience` ``()`` — always, also after an error: drop what the experience held.
    5. :meth:`after_experience` ``(exp, x, y)`` — after a successful experience (Joint keeps the data, iCaRL
       its exemplars).
    6. :meth:`history_info` ``(i) -> dict`` — extra entries for the experience's history record.

    :meth:`~Strategy.logits` answers :meth:`~Strategy.predict` (default: the learner over the classes seen);
    :meth:`~Strategy.config`, :meth:`~Strategy.state_dict` and :meth:`~Strategy.load_state_dict` extend the
    base's with what the strategy adds. The hooks' former underscore names (``_begin``, ``_loss``,
    ``_step_loss``, ...: :attr:`LEGACY_HOOKS`) still work.

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
    LEGACY_HOOKS = {**Strategy.LEGACY_HOOKS, "_train_set": "train_set", "_begin": "before_experience",
                    "_learned": "after_experience", "_end": "cleanup_experience", "_epoch_begin": "before_epoch",
                    "_loss": "criterion", "_step_loss": "step_loss", "_fit": "fit", "_models": "trained_models",
                    "_record_info": "history_info"}

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
        x, y = self.train_set(experience)
        self.before_experience(experience, i)
        try:
            loss = self.fit(x, y, experience, i)
        finally:
            self.cleanup_experience()
        self.after_experience(experience, x, y)
        del x, y
        self._record(experience, train_size=int(experience.train_y.shape[0]), final_loss=loss,
                     train_s=round(time.perf_counter() - t0, 3), **self.history_info(i))

    def history_info(self, i: int) -> dict[str, Any]:
        """Extras for experience i's history entry (the synthesising strategies: their synthesis)."""
        return {}

    def train_set(self, exp) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) to train on for this experience (the experience's own data; Joint adds its memory)."""
        return exp.train_x, exp.train_y

    def before_experience(self, exp, i: int) -> None:
        """Before experience i's training (LwF freezes the previous model here)."""

    def after_experience(self, exp, x: torch.Tensor, y: torch.Tensor) -> None:
        """After the experience's training succeeded, with the set it trained on (Joint keeps it here; iCaRL
        selects exemplars)."""

    def cleanup_experience(self) -> None:
        """After experience i's training, also after an error (LwF drops the previous model here)."""

    def before_epoch(self, epoch: int, exp, i: int) -> None:
        """At the start of each training epoch (0-based) of experience i, the learner in train mode
        (DeepInversion-CIL synthesises its later rounds here)."""

    def freeze_previous(self) -> list[int]:
        """Before a task after the first: a frozen copy of the learner becomes ``self.prev`` and ``self._old`` the
        classes seen so far (on the device); returns those classes."""
        self.prev = frozen_copy(self.model)
        old = list(self.classes_seen)
        self._old = torch.tensor(old, dtype=torch.int64, device=self._device())
        return old

    def active_classes(self, exp) -> torch.Tensor:
        """The classes seen so far, this experience's included (sorted, on the device)."""
        seen = sorted(set(self.classes_seen) | {int(c) for c in exp.classes})
        return torch.tensor(seen, dtype=torch.int64, device=self._device())

    def criterion(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, step: TrainStep) -> torch.Tensor:
        """The loss of a minibatch ``x`` (B, C, H, W), labels ``y`` (B,), on the learner's ``logits``
        (B, num_classes): a scalar, the mean over the rows. Default: cross-entropy over the active units
        (``step.active``; ``step.pos`` maps a class to its column)."""
        return F.cross_entropy(logits.index_select(1, step.active), step.pos[y])

    def step_loss(self, xb: torch.Tensor, yb: torch.Tensor, step: TrainStep) -> torch.Tensor:
        """One minibatch's loss, a mean over its rows (DeepInversion-CIL adds synthetic images of the old
        classes here). The learner's forward is ``step.forward`` (DDP under torchrun); ``xb`` holds rows
        ``lo...`` of a minibatch of ``n`` (``step.rows = (lo, n)``): draws for the minibatch are made for
        all ``n`` rows, and this rank's taken."""
        return self.criterion(step.forward(xb), xb, yb, step)

    def trained_models(self) -> tuple[nn.Module | None, ...]:
        """The models whose pooling layers take the fused window_pool during training."""
        return (self.model,)

    def _fill(self) -> float:
        return 0.0

    def fit(self, x: torch.Tensor, y: torch.Tensor, exp, i: int) -> float:
        """Trains the learner on ``(x, y)`` (the :meth:`train_set`) for ``epochs`` of SGD; returns the last
        running loss."""
        dev = self._device()
        active = self.active_classes(exp)
        pos = torch.full((self.num_classes,), -1, dtype=torch.int64, device=dev)
        pos[active] = torch.arange(active.numel(), device=dev)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "train", i))
        # Under torchrun: DDP over the ranks, each on its share of every minibatch (exml_fast.cl.parallel).
        steps = ShardedSteps(self)
        step = TrainStep(active=active, pos=pos, experience=i, generator=gen, forward=steps.forward)
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        bounds = minibatch_bounds(int(x.shape[0]), self.batch_size)
        total = self.epochs * len(bounds)
        bar = Progress(total, f"train {i}", self.progress and steps.rank == 0)
        running = RunningLoss(bar, total, dev, reduce=steps.mean_over_ranks if steps.sharded else None)
        self.model.train()
        with fast_layers(*self.trained_models()):
            try:
                for epoch in range(self.epochs):
                    self.before_epoch(epoch, exp, i)
                    lr = self.lr * 0.1 ** sum(epoch >= m for m in self.lr_milestones)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    perm = torch.randperm(int(x.shape[0]), generator=gen)
                    for start, end in bounds:
                        lo, hi, scale = steps.rows(end - start)
                        idx = perm[start + lo : start + hi]
                        xb = x[idx].to(dev, non_blocking=True)
                        yb = y[idx].to(dev, non_blocking=True)
                        step.rows = (lo, end - start)
                        if self.augment and (self.pad_crop or self.flip):
                            xb = augment_batch(xb, gen, pad_crop=self.pad_crop, flip=self.flip, fill=self._fill(),
                                               within=step.rows)
                        loss = steps.scaled(self.step_loss(xb, yb, step), scale)
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
    def logits(self, x, task_ids):
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


def data_strategy_kwargs(ctx: BuildContext, opt: dict[str, Any]) -> dict[str, Any]:
    """The :class:`DataStrategy` keyword arguments of a run: its training recipe from the run options ``opt``
    (``epochs`` None: the experts' epochs for the scenario) and the context's classes, seed, device and
    progress."""
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
#: The run options every class-incremental strategy reads.
CIL_OPTIONS = frozenset({"epochs", "arch", "lr", "momentum", "weight_decay", "batch_size", "augment", "flip",
                         "lr_milestones"})
