"""Data-free replay for any Avalanche strategy: :class:`DataFreeReplayPlugin` mixes images synthesised from the
model just trained into the next experience's minibatches."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from exml_fast._utils.checks import check_int
from exml_fast.cl.strategies import SynthesizerSource, derive_seed
from exml_fast.cl.strategies.base import frozen_copy
from exml_fast.cl.strategies.deepinversion_cil import old_class_distillation
from exml_fast.integrations.avalanche.convert import AvalancheExpert
from exml_fast.integrations.avalanche.exml_strategy import _output_width
from exml_fast.synth import DeepInversion
from exml_fast.synth.base import Synthesizer

__all__ = ["DataFreeReplayPlugin"]


class DataFreeReplayPlugin(SupervisedPlugin):
    """Exemplar-free replay for any Avalanche strategy: images synthesised from the trained model stand in for
    the data of past experiences.

    After each training experience a frozen copy of the model just trained is kept; before the next, it
    synthesises ``per_class`` images of every class seen so far with ``synthesizer`` (exml_fast's
    :class:`~exml_fast.synth.DeepInversion` by default, whose ``preset="auto"`` picks its settings from the
    model itself, so it needs no tuning). Every training minibatch of the following experience then gets
    ``replay_size`` of them appended (drawn with replacement; default: as many as the minibatch's real samples),
    labelled with the class each was made for, so the strategy's own loss (``Naive``'s cross-entropy, ``LwF``'s,
    ``EWC``'s, ...) trains on them.

    With ``distill=True`` the synthetic images are learnt from the previous model's logits instead of their
    labels, as DeepInversion-CIL's Eq. 11 does: the model sees the mixed minibatch in one forward pass, then the
    synthetic rows leave ``strategy.mbatch`` and ``strategy.mb_output`` (the strategy's own loss and the
    training metrics cover the real rows), and the plugin adds Eq. 11's two distillation terms
    (:func:`~exml_fast.cl.strategies.deepinversion_cil.old_class_distillation`): the previous model's softmax
    over the old classes as the target of the synthetic rows, and its distillation on the real rows' old-class
    logits. ``Naive`` with this plugin and ``distill=True`` is exml_fast's ``deepinversion-cil`` (whose
    cross-entropy runs over the classes seen so far, ``Naive``'s over all the model's outputs). The images of
    the previous experience are dropped when new ones are made: no real image is ever kept.

    The synthetic rows follow the real ones in ``strategy.mbatch`` (inputs, labels, and task labels when the
    minibatch has them: the first real row's). The classes of an experience are its
    ``classes_in_this_experience`` (else the labels of its minibatches); the input shape is the minibatches'.

    Args:
        synthesizer: a synthesizer class of :mod:`exml_fast.synth` (:class:`~exml_fast.synth.DeepInversion`,
            :class:`~exml_fast.synth.ModelInversion`, :class:`~exml_fast.synth.DataImpressions`).
        per_class: images per class seen, made after each experience (deepinversion-cil's default: 250).
        synth_iterations, synth_batch_size: the synthesizer's optimisation steps per batch (None: its
            default) and its batch size.
        synth_options: further keyword arguments of the synthesizer (e.g. ``{"lr": 0.1}``).
        input_shape: (C, H, W) of the inputs; None: read off the first training minibatch.
        mean, std: the inputs' per-channel normalisation (of pixels in [0, 1]): synthetic images stay in the
            range of valid pixels. None: no clip.
        replay_size: synthetic images appended to each minibatch (None: the minibatch's size).
        distill: add the distillation of the previous model's logits (above).
        seed: the seed of the synthesis and of the draws.
        progress: the synthesizer's progress bars.

    Attributes:
        replayed: synthetic images mixed into minibatches so far.
        replayed_per_class: (num_classes,) int64 counts of those images by label (None before the first synthesis).
        synthesis: one record per synthesis: ``experience`` (1-based, the experience the images are for),
            ``images``, ``classes``, ``teacher_agreement`` (the share the model labels as their class), ``seconds``.
    """

    def __init__(self, *, synthesizer: type[Synthesizer] = DeepInversion, per_class: int = 250,
                 synth_iterations: int | None = None, synth_batch_size: int = 256,
                 synth_options: dict[str, Any] | None = None, input_shape: Sequence[int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 replay_size: int | None = None, distill: bool = False, seed: int = 0,
                 progress: bool = False) -> None:
        super().__init__()
        owner = type(self).__name__
        if not (isinstance(synthesizer, type) and issubclass(synthesizer, Synthesizer)):
            raise TypeError(f"{owner}: synthesizer must be a Synthesizer class of exml_fast.synth (DeepInversion, "
                            f"ModelInversion, DataImpressions); got {synthesizer!r}")
        self.per_class = check_int(per_class, "per_class", owner, low=1)
        options = dict(synth_options or {})
        options["batch_size"] = check_int(synth_batch_size, "synth_batch_size", owner, low=1)
        if synth_iterations is not None:
            options["iterations"] = check_int(synth_iterations, "synth_iterations", owner, low=1)
        if mean is not None or std is not None:
            options.update(mean=mean, std=std)
        self.source = SynthesizerSource(synthesizer, **options)
        if input_shape is not None:
            shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else ()
            if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
                raise ValueError(f"{owner}: input_shape must be None or (C, H, W), three positive ints; got "
                                 f"{input_shape!r}")
            input_shape = shape
        self.input_shape = input_shape
        self.replay_size = None if replay_size is None else check_int(replay_size, "replay_size", owner, low=1)
        self.distill = bool(distill)
        self.seed = check_int(seed, "seed", owner, low=0)
        self.progress = bool(progress)
        self.classes_seen: set[int] = set()
        self.replayed = 0
        self.replayed_per_class: torch.Tensor | None = None
        self.synthesis: list[dict[str, Any]] = []
        self.experiences_done = 0
        self._teacher = None  # the model just trained, frozen, until it has made the next experience's images
        self._x = self._y = None  # the synthetic images (CPU) and their labels
        self._prev = self._old = None  # for distill: the previous model and the old classes
        self._current: set[int] = set()
        self._n_real = 0
        self._mixed = None  # with distill: the mixed minibatch's output and inputs, between forward and backward
        self._draws: torch.Generator | None = None

    # -- experiences ------------------------------------------------------------------------------------------
    def before_training_exp(self, strategy, *args, **kwargs):
        """Makes the images of the classes seen so far from the model trained last (none before the first)."""
        exp = strategy.experience
        known = getattr(exp, "classes_in_this_experience", None)
        self._current = {int(c) for c in known} if known is not None else set()
        self._draws = torch.Generator().manual_seed(derive_seed(self.seed, "data-free-replay-draws",
                                                                self.experiences_done + 1))
        if self._teacher is not None:
            self._synthesize(strategy)
        if self.distill and self._prev is not None:
            self._old = torch.tensor(sorted(self.classes_seen), dtype=torch.int64, device=strategy.device)

    def after_training_exp(self, strategy, *args, **kwargs):
        """Keeps a frozen copy of the model just trained: the teacher of the next experience's images."""
        self.classes_seen |= self._current
        self.experiences_done += 1
        self._teacher = frozen_copy(strategy.model)

    def _synthesize(self, strategy) -> None:
        owner = type(self).__name__
        teacher, self._teacher = self._teacher, None
        if self.input_shape is None:
            raise ValueError(f"{owner}: input_shape is unknown (no training minibatch was seen); pass "
                             "input_shape=(C, H, W)")
        if not self.classes_seen:
            raise ValueError(f"{owner}: no class was seen in the experiences trained so far (their "
                             "classes_in_this_experience and labels are empty)")
        dev = strategy.device
        width = _output_width(teacher, self.input_shape, dev)
        classes = sorted(self.classes_seen)
        if classes[-1] >= width:
            raise ValueError(f"{owner}: the strategy's model answers {width} logits but the experiences hold "
                             f"class {classes[-1]}: the model needs one output per class")
        i = self.experiences_done + 1
        view = AvalancheExpert(teacher, tuple(classes), width, None,
                               {"input_shape": list(self.input_shape), "experience": i - 1})
        t0 = time.perf_counter()
        batch = self.source.generate(view, self.per_class * len(classes), seed=derive_seed(self.seed,
                                     "data-free-replay", i), device=dev, progress=self.progress)
        with torch.no_grad():
            agree = float((teacher(batch.x.to(dev)).argmax(1) == batch.y.to(dev)).float().mean())
        self._x, self._y = batch.x.detach().to("cpu", torch.float32), batch.y.detach().to("cpu", torch.int64)
        self.synthesis.append({"experience": i, "images": int(self._y.numel()), "classes": classes,
                               "teacher_agreement": agree, "seconds": round(time.perf_counter() - t0, 3)})
        self._prev = teacher if self.distill else None
        if self.replayed_per_class is None:
            self.replayed_per_class = torch.zeros(width, dtype=torch.int64)

    # -- minibatches ----------------------------------------------------------------------------------------
    def before_training_iteration(self, strategy, *args, **kwargs):
        """Appends synthetic images (and their labels) to the real minibatch."""
        mb = strategy.mbatch
        x, y = mb[0], mb[1]
        if self.input_shape is None:
            self.input_shape = tuple(int(s) for s in x.shape[1:])
        if strategy.experience is not None and getattr(strategy.experience, "classes_in_this_experience",
                                                       None) is None:
            self._current |= set(torch.unique(y).tolist())
        self._n_real = int(x.shape[0])
        if self._x is None:
            return
        n = self.replay_size or self._n_real
        idx = torch.randint(0, self._x.shape[0], (n,), generator=self._draws)
        xs = self._x[idx].to(x.device, x.dtype, non_blocking=True)
        ys = self._y[idx].to(y.device, non_blocking=True)
        mb[0], mb[1] = torch.cat([x, xs]), torch.cat([y, ys])
        if len(mb) >= 3:  # task labels: the synthetic rows take the first real row's
            mb[-1] = torch.cat([mb[-1], mb[-1][:1].expand(n)])
        self.replayed_per_class += torch.bincount(self._y[idx], minlength=self.replayed_per_class.numel())
        self.replayed += n

    def after_forward(self, strategy, *args, **kwargs):
        """With ``distill``: takes the synthetic rows out of the minibatch and its output once the model has seen
        them with the real ones (one forward, one set of BatchNorm statistics), so that the strategy's own loss
        covers the real rows and :meth:`before_backward` the synthetic ones."""
        if not self._distilling():
            return
        n, mb = self._n_real, strategy.mbatch
        self._mixed = (strategy.mb_output, mb[0])
        strategy.mb_output = strategy.mb_output[:n]
        for k in range(len(mb)):
            mb[k] = mb[k][:n]

    def before_backward(self, strategy, *args, **kwargs):
        """With ``distill``: adds Eq. 11's distillation terms to the strategy's loss."""
        if not self._distilling() or self._mixed is None:
            return
        (logits, x), self._mixed = self._mixed, None
        # the classes seen, this experience's included (read off its labels when it has no classes timeline)
        old = self._old
        active = torch.tensor(sorted(self.classes_seen | self._current), dtype=torch.int64, device=logits.device)
        pos = torch.full((logits.shape[1],), -1, dtype=torch.int64, device=logits.device)
        pos[active] = torch.arange(active.numel(), device=logits.device)
        with torch.no_grad():
            old_logits = self._prev(x).index_select(1, old)
        synth_term, kd = old_class_distillation(logits.index_select(1, active), old_logits, n_real=self._n_real,
                                                pos_old=pos[old])
        strategy.loss = strategy.loss + synth_term + kd

    def _distilling(self) -> bool:
        return self.distill and self._prev is not None and self._x is not None
