"""Where Ex-Model Distillation's samples come from: a :class:`DataSource` makes ``n`` labelled samples for
one expert's classes (synthesizers through :class:`SynthesizerSource`, real data through :class:`RealReplay`)."""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch
from torch import nn

from exml_fast.cl.buffer import class_balanced_indices
from exml_fast.cl.strategies.base import expert_name
from exml_fast.synth import AuxiliaryData, DataImpressions, SyntheticBatch
from exml_fast.synth.base import Synthesizer

__all__ = ["DataSource", "RealReplay", "SynthesizerGenerator", "SynthesizerSource", "as_source"]


class DataSource(Protocol):
    """What ED asks of its data source: ``n`` labelled samples for one expert's classes.

    A ``generate`` that also takes ``learner=`` is given the learner (from
    the second expert on), e.g. for Adaptive DeepInversion; one that takes
    ``distributed=`` is told whether the run is sharded over
    ``torch.distributed`` ranks (then every rank calls it with the same
    arguments and must receive the same samples).
    """

    def generate(self, expert, n: int, *, seed: int, device: torch.device, progress: bool) -> SyntheticBatch:
        ...

    def describe(self) -> dict[str, Any]:
        ...


class SynthesizerSource:
    """Builds a synthesizer for each expert and asks it for ``n`` samples of the expert's classes.

    ``SynthesizerSource(ModelInversion, iterations=500)`` makes
    ``ModelInversion(expert.model, input_shape=expert.input_shape,
    mean=expert.mean, std=expert.std, num_classes=expert.num_classes,
    iterations=500)`` per expert (options override what the expert's
    metadata gives). For :class:`~exml_fast.synth.AuxiliaryData` pass the
    auxiliary inputs as ``data=``. Labels:

    - model inversion / DeepInversion: the class each input was optimised for;
    - Data Impressions: ``argmax`` of the Dirichlet target over the expert's
      classes (the paper's ``y = argmax y_di``, kept inside ``Y^i``);
    - auxiliary data: the expert's ``argmax`` over its classes.

    ``competitor="learner"`` makes Adaptive DeepInversion against the
    learner: :class:`ExModelDistillation` passes its model as ``learner``
    once it has distilled an expert, and the synthesizer gets it as its
    competitor (the first expert, with nothing learnt to compete with, is
    synthesised without the term).

    ``distributed=True`` (a run under torchrun): the synthesizer's batches
    are split over the ranks and gathered back, so every rank gets the whole
    set (:meth:`~exml_fast.synth.base.Synthesizer.synthesize`).

    The synthesizer (and so its reference to the expert) is dropped when
    ``generate`` returns.
    """

    #: synthetic or auxiliary data: no data of the experiences is seen
    ex_model = True

    def __init__(self, synthesizer: type[Synthesizer], **options: Any) -> None:
        if not (isinstance(synthesizer, type) and issubclass(synthesizer, Synthesizer)):
            raise TypeError(f"SynthesizerSource: synthesizer must be a Synthesizer subclass (ModelInversion, "
                            f"DeepInversion, DataImpressions, AuxiliaryData); got {synthesizer!r}")
        if issubclass(synthesizer, AuxiliaryData) and "data" not in options:
            raise ValueError("SynthesizerSource: AuxiliaryData needs the auxiliary inputs as data=")
        self.synthesizer = synthesizer
        self.options = options

    def describe(self) -> dict[str, Any]:
        opts = {k: (f"<{type(v).__name__} {tuple(v.shape)}>" if isinstance(v, torch.Tensor) else
                    v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else f"<{type(v).__name__}>")
                for k, v in sorted(self.options.items())}
        return {"method": self.synthesizer.method, "options": opts}

    def generate(self, expert, n: int, *, seed: int, device: torch.device, progress: bool,
                 learner: nn.Module | None = None, distributed: bool = False) -> SyntheticBatch:
        cls = self.synthesizer
        kw = dict(self.options)
        if isinstance(kw.get("competitor"), str):
            if kw["competitor"] != "learner":
                raise ValueError(f"SynthesizerSource: competitor must be an nn.Module or 'learner'; got "
                                 f"{kw['competitor']!r}")
            if learner is None:
                kw.pop("competitor")
                kw.pop("competition_weight", None)
            else:
                kw["competitor"] = learner
        if "mean" not in kw and expert.mean is not None:
            kw["mean"], kw["std"] = expert.mean, expert.std
        kw.setdefault("num_classes", expert.num_classes)
        kw.setdefault("device", device)
        if issubclass(cls, AuxiliaryData):
            synth = cls(expert.model, kw.pop("data"), **kw)
        else:
            if "input_shape" not in kw:
                if expert.input_shape is None:
                    raise ValueError(f"SynthesizerSource: expert {expert_name(expert)} has no input_shape in its "
                                     "metadata; pass input_shape= to the source")
                kw["input_shape"] = expert.input_shape
            synth = cls(expert.model, **kw)
        classes = list(expert.classes)
        batch = synth.synthesize(n, classes=classes, generator=seed, progress=progress, distributed=bool(distributed))
        if isinstance(synth, DataImpressions) and batch.soft_targets is not None:
            cls_t = torch.tensor(classes, dtype=torch.int64, device=batch.soft_targets.device)
            batch.y = cls_t[batch.soft_targets[:, cls_t].argmax(1)].to(batch.y.device)
        return batch


class RealReplay:
    """Replay ED's data source: real training samples of the expert's own experience.

    Breaks the ExML rule that no data is seen — it is the paper's upper
    bound for the synthetic generators. ``data`` is a
    :class:`~exml_fast.cl.scenarios.Scenario` (the expert's ``meta["experience"]``
    picks the experience) or a callable ``expert -> (x, y)``. ``n`` samples
    are drawn class-balanced, without replacement.
    """

    #: real data of the experiences: ED with this source is not ex-model
    ex_model = False

    def __init__(self, data) -> None:
        if not (callable(data) or hasattr(data, "experiences")):
            raise TypeError(f"RealReplay: data must be a Scenario or a callable expert -> (x, y); "
                            f"got {type(data).__name__}")
        self.data = data

    def describe(self) -> dict[str, Any]:
        return {"method": "real-replay", "scenario": getattr(self.data, "name", None)}

    def generate(self, expert, n: int, *, seed: int, device: torch.device, progress: bool) -> SyntheticBatch:
        if callable(self.data):
            x, y = self.data(expert)
        else:
            i = expert.meta.get("experience")
            if not isinstance(i, int) or not 0 <= i < len(self.data.experiences):
                raise ValueError(f"RealReplay: expert {expert_name(expert)} has no valid meta['experience'] "
                                 f"index into the scenario's {len(self.data.experiences)} experiences; got {i!r}")
            exp = self.data.experiences[i]
            x, y = exp.train_x, exp.train_y
        idx = class_balanced_indices(y, n, generator=torch.Generator().manual_seed(seed))
        return SyntheticBatch(x[idx].float(), y[idx].long(), None, {}, expert.mean, expert.std)


def as_source(source, options: dict[str, Any] | None, owner: str):
    """``source`` as a :class:`DataSource`: a Synthesizer class becomes a :class:`SynthesizerSource` with
    ``options``; anything with ``generate`` and ``describe`` is taken as it is."""
    if isinstance(source, type) and issubclass(source, Synthesizer):
        return SynthesizerSource(source, **(options or {}))
    if options:
        raise ValueError(f"{owner}: source_options only apply when source is a Synthesizer class")
    if not (hasattr(source, "generate") and hasattr(source, "describe")):
        raise TypeError(f"{owner}: source must be a Synthesizer class (ModelInversion, DataImpressions, "
                        f"AuxiliaryData, DeepInversion), a SynthesizerSource, RealReplay, or an object with "
                        f"generate() and describe(); got {source!r}")
    return source


class SynthesizerGenerator(SynthesizerSource):
    """Deprecated name of :class:`SynthesizerSource` (``generator`` now means a ``torch.Generator`` only);
    kept for one release."""

    def __init__(self, synthesizer: type[Synthesizer], **options: Any) -> None:
        warnings.warn("SynthesizerGenerator is renamed SynthesizerSource; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        super().__init__(synthesizer, **options)


#: Deprecated name of :class:`DataSource`.
Generator = DataSource
