"""Converters between exml_fast's containers and Avalanche's: an exml_fast
:class:`~exml_fast.cl.scenarios.Scenario` as an Avalanche class-incremental benchmark, an
:class:`~exml_fast.cl.experts.ExpertStream` as an ``ExModelCLScenario`` and back, and
:class:`AvalancheExpert`, the view of one ``ExModelExperience`` that exml_fast's strategies read."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from avalanche.benchmarks import ExModelCLScenario, nc_benchmark
from torch import nn
from torch.utils.data import TensorDataset

from exml_fast.cl.experts import Expert, ExpertStream, InputMeta
from exml_fast.cl.scenarios import Scenario, scenario_of

__all__ = ["AvalancheExpert", "expert_experiences", "to_avalanche_benchmark", "to_exmodel_scenario",
           "to_expert_stream"]


@dataclass
class AvalancheExpert(InputMeta):
    """An Avalanche ``ExModelExperience`` as exml_fast's strategies read an expert (what
    :class:`~exml_fast.cl.experts.Expert` offers, without the architecture name a saved expert needs).

    Attributes:
        model: the expert, (B, C, H, W) → (B, num_classes) logits.
        classes: the output units it was trained on (``classes_in_this_experience``), sorted.
        num_classes: its number of outputs.
        task_id: the task label (None: class-incremental).
        meta: ``input_shape`` [C, H, W], ``mean``, ``std`` (per channel, of inputs in [0, 1]; may be None) and
            ``experience``, the experience's index (:class:`~exml_fast.cl.strategies.RealReplay` reads it).
    """

    model: nn.Module
    classes: tuple[int, ...]
    num_classes: int
    task_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_experience(cls, experience, *, num_classes: int, input_shape: Sequence[int],
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        owner: str = "AvalancheExpert") -> AvalancheExpert:
        """The expert of an ``ExModelExperience`` (anything with ``expert_model`` and
        ``classes_in_this_experience``); ``num_classes``, ``input_shape``, ``mean`` and ``std`` describe its
        inputs and outputs (an Avalanche experience does not carry them). Raises TypeError / ValueError naming
        ``experience`` when it is not one."""
        model = getattr(experience, "expert_model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: experience must be an ExModelExperience with an nn.Module expert_model "
                            f"(an experience of ExModelCLScenario.expert_models_stream); got "
                            f"{type(experience).__name__} with expert_model={type(model).__name__}")
        classes = getattr(experience, "classes_in_this_experience", None)
        if classes is None or len(list(classes)) == 0:
            raise ValueError(f"{owner}: experience {getattr(experience, 'current_experience', '?')} has no "
                             "classes_in_this_experience: an expert's classes must be known (build the "
                             "ExModelCLScenario from a class-incremental benchmark)")
        classes = tuple(sorted(int(c) for c in classes))
        if any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"{owner}: experience {experience.current_experience}: classes {list(classes)} are "
                             f"not all output units in [0, {num_classes})")
        index = getattr(experience, "current_experience", None)
        meta = {"input_shape": [int(s) for s in input_shape], "mean": None if mean is None else list(mean),
                "std": None if std is None else list(std), "experience": index}
        return cls(model, classes, int(num_classes), None, meta)


def expert_experiences(scenario) -> list:
    """The experiences of an ``ExModelCLScenario``'s expert stream, each checked to hold an expert; TypeError
    naming ``scenario`` otherwise."""
    stream = getattr(scenario, "expert_models_stream", None)
    if stream is None:
        raise TypeError(f"scenario must be an Avalanche ExModelCLScenario (with an expert_models_stream); got "
                        f"{type(scenario).__name__}")
    exps = list(stream)
    for e in exps:
        if not isinstance(getattr(e, "expert_model", None), nn.Module):
            raise TypeError(f"scenario: experience {getattr(e, 'current_experience', '?')} of the expert stream "
                            "has no expert_model (an nn.Module)")
    return exps


def to_avalanche_benchmark(scenario: Scenario):
    """An exml_fast scenario as an Avalanche class-incremental benchmark (``nc_benchmark``) on the same tensors.

    Experience i of the benchmark's ``train_stream`` / ``test_stream`` holds the classes of the scenario's
    experience i (``classes_in_this_experience``), and its samples are the scenario's, already normalised:
    (1, C, H, W) float32 inputs with int64 labels (the original class indices). Multi-task scenarios keep their
    task labels (experience i is task i).

    Args:
        scenario: an :class:`~exml_fast.cl.scenarios.Scenario` (:func:`~exml_fast.cl.scenarios.make_scenario`).

    Returns:
        An Avalanche ``NCScenario``.
    """
    if not isinstance(scenario, Scenario):
        raise TypeError(f"to_avalanche_benchmark: scenario must be an exml_fast Scenario (make_scenario(...)); got "
                        f"{type(scenario).__name__}")
    exps = scenario.experiences
    train = TensorDataset(torch.cat([e.train_x for e in exps]), torch.cat([e.train_y for e in exps]))
    test = TensorDataset(torch.cat([e.test_x for e in exps]), torch.cat([e.test_y for e in exps]))
    order = [int(c) for e in exps for c in e.classes]
    return nc_benchmark(train, test, len(exps), task_labels=scenario.multi_task, shuffle=False,
                        fixed_class_order=order, per_exp_classes={i: len(e.classes) for i, e in enumerate(exps)})


def to_exmodel_scenario(stream: ExpertStream, scenario: Scenario | None = None, *,
                        root: str | os.PathLike | None = None) -> ExModelCLScenario:
    """An expert stream as Avalanche's ``ExModelCLScenario``.

    Every expert of ``stream`` is loaded (Avalanche's scenario holds all its experts); the scenario's
    ``original_benchmark`` is :func:`to_avalanche_benchmark` of the scenario the experts were trained on, whose
    ``test_stream`` is the evaluation. What an Avalanche experience does not carry (input shape, normalisation)
    stays in the stream: ``stream[0].input_shape``, ``.mean``, ``.std``.

    Args:
        stream: the :class:`~exml_fast.cl.experts.ExpertStream`.
        scenario: the scenario the experts were trained on; None: rebuilt from the stream's metadata
            (:func:`~exml_fast.cl.scenarios.scenario_of`, reading the data from ``root``).
        root: where the dataset's files are (None: the usual places).

    Returns:
        The ``ExModelCLScenario``; its ``expert_models_stream`` holds the experts in order.
    """
    if not isinstance(stream, ExpertStream):
        raise TypeError(f"to_exmodel_scenario: stream must be an exml_fast ExpertStream; got {type(stream).__name__}")
    if scenario is None:
        scenario = scenario_of(stream, root=root)
    experts = [sorted(stream.classes(i)) for i in range(len(stream))]
    if [list(e.classes) for e in scenario.experiences] != experts:
        raise ValueError(f"to_exmodel_scenario: the experts' classes {experts} are not the scenario's experiences' "
                         f"{[list(e.classes) for e in scenario.experiences]}: scenario must be the one the stream "
                         "was trained on")
    benchmark = to_avalanche_benchmark(scenario)
    return ExModelCLScenario(benchmark, [expert.model for expert in stream])


def to_expert_stream(scenario, path: str | os.PathLike, *, arch: str, arch_kwargs: Mapping[str, Any] | None = None,
                     input_shape: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, meta: Mapping[str, Any] | None = None,
                     weights_format: str = "safetensors") -> ExpertStream:
    """Writes the experts of an Avalanche ``ExModelCLScenario`` as an exml_fast expert stream at ``path``.

    The experts of a multi-task scenario (an original benchmark whose experiences carry more than one task
    label) keep their task labels (``Expert.task_id``); a class-incremental one's have none.

    An expert on disk is rebuilt from an architecture name, so every expert must be a model of ``arch`` (a key
    of :data:`exml_fast.models.ARCHS`, or a name added with :func:`exml_fast.models.register_arch`); its
    weights are checked against a fresh ``build_model(arch, **arch_kwargs)`` before they are written.

    Args:
        scenario: the ``ExModelCLScenario``.
        path: the stream's folder (created; an existing stream there is an error).
        arch, arch_kwargs: the experts' architecture (``arch_kwargs`` None: read off the model).
        input_shape, mean, std: the experts' inputs, recorded in each expert's ``meta`` (synthesis needs
            ``input_shape``).
        meta: the stream's description (e.g. the ``meta`` of the stream the scenario was made from, so that
            :func:`~exml_fast.cl.scenarios.scenario_of` rebuilds the data scenario).
        weights_format: "safetensors" or "torch".

    Returns:
        The :class:`~exml_fast.cl.experts.ExpertStream`.
    """
    exps = expert_experiences(scenario)
    # Expert i was trained on experience i of the original benchmark, which holds the task labels (an
    # ExModelExperience has none); a multi-task benchmark has more than one, a class-incremental one task 0 only
    original = getattr(getattr(scenario, "original_benchmark", None), "train_stream", None)
    tasks = [int(getattr(e, "task_label", 0) or 0) for e in original] if original is not None else [0] * len(exps)
    multi_task = len(set(tasks)) > 1
    stream = ExpertStream.create(path, meta=dict(meta or {"source": "avalanche ExModelCLScenario"}))
    for i, e in enumerate(exps):
        classes = sorted(int(c) for c in (e.classes_in_this_experience or ()))
        expert_meta = {"experience": i}
        for key, value in (("input_shape", input_shape), ("mean", mean), ("std", std)):
            if value is not None:
                expert_meta[key] = [v for v in value]
        model = e.expert_model
        stream.append(Expert(model, classes, arch=arch, arch_kwargs=arch_kwargs, meta=expert_meta,
                             task_id=tasks[i] if multi_task else None), weights_format=weights_format)
    return stream
