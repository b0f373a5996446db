"""Ex-Model Distillation as an Avalanche strategy: :class:`ExModelDistillationStrategy` learns from an
``ExModelCLScenario``'s expert stream with exml_fast's :class:`~exml_fast.cl.strategies.ExModelDistillation`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import trigger_plugins
from torch import nn

from exml_fast.cl.strategies import ExModelDistillation
from exml_fast.integrations.avalanche.convert import AvalancheExpert
from exml_fast.synth import DeepInversion
from exml_fast.synth.base import check_input_shape, eval_mode

__all__ = ["ExModelDistillationStrategy"]


@torch.no_grad()
def _output_width(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int:
    """The number of logits ``model`` answers one zero input with (each submodule's train/eval mode kept)."""
    with eval_mode(model):
        out = model(torch.zeros(1, *input_shape, device=device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model must map (B, C, H, W) inputs to (B, K) logits; got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[1])


class ExModelDistillationStrategy(SupervisedTemplate):
    """Ex-Model Distillation (the ExML paper's Algorithm 1) on Avalanche's Ex-Model scenario.

    ``train`` takes the experiences of an ``ExModelCLScenario.expert_models_stream`` (each holds a trained
    ``expert_model`` and its ``classes_in_this_experience``, and no data); for each, exml_fast's
    :class:`~exml_fast.cl.strategies.ExModelDistillation` synthesises samples from the expert with its
    ``source``, updates its class-balanced synthetic buffer and distils the expert and the previous learner into
    ``model`` with the fused ED loss. ``eval`` is Avalanche's: pass the original benchmark's test stream
    (``scenario.original_benchmark.test_stream``), and Avalanche's evaluation plugin (its metrics and loggers)
    reports as for any strategy; ``before_training_exp`` / ``after_training_exp`` and the other experience-level
    callbacks reach the plugins. The distillation steps are exml_fast's own loop (fused loss, its optimiser),
    so the per-minibatch callbacks and training-minibatch metrics do not fire during training.

    Args:
        model: the learner, (B, C, H, W) → (B, num_classes) logits, trained in place (``strategy.model``).
        input_shape: (C, H, W) of the scenario's inputs (the synthesizers need it; an Avalanche experience
            does not carry it).
        mean, std: the inputs' per-channel normalisation (of pixels in [0, 1]): the synthesizers keep their
            images in the range of valid pixels. None: no clip.
        source: where ED's samples come from: a synthesizer class of :mod:`exml_fast.synth`
            (:class:`~exml_fast.synth.DeepInversion`, the default, whose ``preset="auto"`` picks its settings
            from each expert; :class:`~exml_fast.synth.ModelInversion`; :class:`~exml_fast.synth.DataImpressions`;
            :class:`~exml_fast.synth.AuxiliaryData` with ``data=`` in ``source_options``), a
            :class:`~exml_fast.cl.strategies.SynthesizerSource` or :class:`~exml_fast.cl.strategies.RealReplay`.
        source_options: keyword arguments of the synthesizer (e.g. ``{"iterations": 500}``).
        buffer_size, iterations, lr, momentum, weight_decay, batch_size, ...: ED's settings, passed through
            ``ed_options`` (see :class:`~exml_fast.cl.strategies.ExModelDistillation`; its defaults are the
            paper's MNIST budget: 30000 distillation steps per expert).
        ed_options: further :class:`~exml_fast.cl.strategies.ExModelDistillation` keyword arguments.
        eval_mb_size: Avalanche's evaluation minibatch size.
        device: where the learner trains and is evaluated.
        plugins, evaluator, eval_every: as any Avalanche strategy (``evaluator`` default: Avalanche's default
            evaluator, accuracy and loss with its interactive logger).
        seed: the seed of ED's synthesis, buffer and minibatch draws.
        progress: exml_fast's progress bars.

    Attributes:
        ed: the :class:`~exml_fast.cl.strategies.ExModelDistillation` doing the work (its ``buffer``,
            ``history``, ``config()``).
    """

    def __init__(self, *, model: nn.Module, input_shape: Sequence[int], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, source=DeepInversion, source_options: dict[str, Any] | None = None,
                 buffer_size: int = 5000, iterations: int = 30000, lr: float = 0.01, batch_size: int = 32,
                 ed_options: dict[str, Any] | None = None, eval_mb_size: int = 256,
                 device: torch.device | str = "cpu", plugins=None, evaluator=default_evaluator, eval_every: int = -1,
                 seed: int = 0, progress: bool = False) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module; got {type(model).__name__}")
        shape = check_input_shape(input_shape, owner)
        device = torch.device(device)
        self.ed = ExModelDistillation(model, source=source, source_options=source_options, buffer_size=buffer_size,
                                      iterations=iterations, lr=lr, batch_size=batch_size, seed=seed, device=device,
                                      progress=progress, **(ed_options or {}))
        self.input_shape = shape
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.num_classes = _output_width(model, shape, device)
        self.ed.num_classes = self.num_classes
        # Avalanche's template asks for an optimiser; ED makes its own SGD for each experience, so this one is
        # never stepped.
        super().__init__(model=self.ed.model, optimizer=torch.optim.SGD(self.ed.model.parameters(), lr=lr),
                         train_mb_size=batch_size, train_epochs=1, eval_mb_size=eval_mb_size, device=device,
                         plugins=plugins, evaluator=evaluator, eval_every=eval_every)
        self._expert: AvalancheExpert | None = None  # the experience being learned, between its callbacks

    @property
    def buffer(self):
        """ED's synthetic buffer (:class:`~exml_fast.cl.buffer.SyntheticBuffer`)."""
        return self.ed.buffer

    def train(self, experiences, eval_streams=None, **kwargs):
        """Learns each experience of ``experiences`` (an ``ExModelCLScenario``'s ``expert_models_stream``, a slice
        of it, or one of its experiences) in order; returns the last metrics. ``eval_streams``: the streams
        the periodic evaluation (``eval_every`` >= 0) runs on — the original benchmark's ``test_stream``;
        None: none (the expert stream holds no data to evaluate on)."""
        return super().train(experiences, [] if eval_streams is None else eval_streams, **kwargs)

    def expert_of(self, experience) -> AvalancheExpert:
        """The expert of an ``ExModelExperience`` as exml_fast reads it, checked against the learner: a
        TypeError naming ``experience`` if it holds no expert, a ValueError if the expert's output width is not
        the learner's."""
        owner = type(self).__name__
        expert = AvalancheExpert.from_experience(experience, num_classes=self.num_classes,
                                                 input_shape=self.input_shape, mean=self.mean, std=self.std,
                                                 owner=f"{owner}.train")
        width = _output_width(expert.model, self.input_shape, next(expert.model.parameters(), torch.zeros(())).device)
        if width != self.num_classes:
            raise ValueError(f"{owner}.train: experience {experience.current_experience}'s expert_model answers "
                             f"{width} logits but the learner (model) {self.num_classes}: every expert and the "
                             "learner must share one output space")
        return expert

    def _before_training_exp(self, **kwargs):
        # No dataset to adapt nor dataloader to make: an ex-model experience holds an expert, not data.
        self._expert = self.expert_of(self.experience)
        trigger_plugins(self, "before_training_exp", **kwargs)

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        self.ed.train(self._expert)
        self._expert = None
        self.model.train()  # Avalanche's training loop expects the model in train mode; ED leaves it in eval
