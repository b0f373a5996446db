"""Ex-Model Continual Learning strategies (the ExML paper, §3-§5).

A strategy learns from a stream of trained experts, one :class:`~exml_fast.cl.experts.Expert`
at a time: ``strategy.train(expert)`` handles one experience and
``strategy.predict(x)`` answers with (B, num_classes) logits. All strategies
share that interface, ``state_dict``/``load_state_dict`` (what a run
checkpoints) and ``config`` (what decides their results).

- :class:`ExModelDistillation` (ED, Algorithm 1): synthesise ``N/i`` samples
  from the i-th expert with ``generator``, keep a fixed-size class-balanced
  :class:`~exml_fast.cl.buffer.SyntheticBuffer`, and distil the expert and the
  previous model into ``model`` with the fused :func:`exml_fast.ops.ed_loss`.
  It keeps no expert after its experience. With :class:`RealReplay` as the
  generator it is the paper's Replay ED (real data: an upper bound), and its
  ``ex_model`` is False (recorded in its config and in a run's result).
- Baselines (§5): :class:`OracleEnsemble` (the task label picks the expert),
  :class:`EnsembleAverage`, :class:`MinEntropyEnsemble` — these keep every
  expert, so they break the ExML memory constraint and only bound it — and
  :class:`ParameterAverage`, the running mean of the experts' parameters
  (one model in memory).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from typing import Any, Protocol

import torch
from torch import nn

from exml_fast._utils.provenance import derive_seed as _derive
from exml_fast.cl.buffer import SyntheticBuffer, class_balanced_indices
from exml_fast.synth import AuxiliaryData, DataImpressions, SyntheticBatch
from exml_fast._utils.progress import Progress
from exml_fast.synth.base import Synthesizer
from exml_fast.training import augment_batch

__all__ = [
    "EnsembleAverage", "ExModelDistillation", "Generator", "MinEntropyEnsemble", "OracleEnsemble",
    "ParameterAverage", "RealReplay", "STRATEGIES", "Strategy", "SynthesizerGenerator",
]

def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and a tag (e.g. ``("generate", 3)``): independent streams per use."""
    return _derive("exml_fast.cl.strategies", seed, *parts)


def _check_int(value, name: str, owner: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}; got {value!r}")
    return value


def _check_float(value, name: str, owner: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{owner}: {name} must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}")
    return float(value)


def _frozen_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# -- generators -------------------------------------------------------------------------


class Generator(Protocol):
    """What ED asks of a data source: ``n`` labelled samples for one expert's classes.

    A ``generate`` that also takes ``learner=`` is given the learner (from
    the second expert on), e.g. for Adaptive DeepInversion.
    """

    def generate(self, expert, n: int, *, seed: int, device: torch.device, progress: bool) -> SyntheticBatch:
        ...

    def describe(self) -> dict[str, Any]:
        ...


class SynthesizerGenerator:
    """Builds a synthesizer for each expert and asks it for ``n`` samples of the expert's classes.

    ``SynthesizerGenerator(ModelInversion, iterations=500)`` makes
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

    The synthesizer (and so its reference to the expert) is dropped when
    ``generate`` returns.
    """

    #: synthetic or auxiliary data: no data of the experiences is seen
    ex_model = True

    def __init__(self, synthesizer: type[Synthesizer], **options: Any) -> None:
        if not (isinstance(synthesizer, type) and issubclass(synthesizer, Synthesizer)):
            raise TypeError(f"SynthesizerGenerator: synthesizer must be a Synthesizer subclass (ModelInversion, "
                            f"DeepInversion, DataImpressions, AuxiliaryData); got {synthesizer!r}")
        if issubclass(synthesizer, AuxiliaryData) and "data" not in options:
            raise ValueError("SynthesizerGenerator: AuxiliaryData needs the auxiliary inputs as data=")
        self.synthesizer = synthesizer
        self.options = options

    def describe(self) -> dict[str, Any]:
        opts = {k: (f"<{type(v).__name__} {tuple(v.shape)}>" if isinstance(v, torch.Tensor) else
                    v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else f"<{type(v).__name__}>")
                for k, v in sorted(self.options.items())}
        return {"method": self.synthesizer.method, "options": opts}

    def generate(self, expert, n: int, *, seed: int, device: torch.device, progress: bool,
                 learner: nn.Module | None = None) -> SyntheticBatch:
        cls = self.synthesizer
        kw = dict(self.options)
        if isinstance(kw.get("competitor"), str):
            if kw["competitor"] != "learner":
                raise ValueError(f"SynthesizerGenerator: competitor must be an nn.Module or 'learner'; got "
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
                    raise ValueError(f"SynthesizerGenerator: expert {expert_name(expert)} has no input_shape in its "
                                     "metadata; pass input_shape= to the generator")
                kw["input_shape"] = expert.input_shape
            synth = cls(expert.model, **kw)
        classes = list(expert.classes)
        batch = synth.synthesize(n, classes=classes, generator=seed, progress=progress)
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


def _as_generator(generator, options: dict[str, Any] | None, owner: str):
    if isinstance(generator, type) and issubclass(generator, Synthesizer):
        return SynthesizerGenerator(generator, **(options or {}))
    if options:
        raise ValueError(f"{owner}: generator_options only apply when generator is a Synthesizer class")
    if not (hasattr(generator, "generate") and hasattr(generator, "describe")):
        raise TypeError(f"{owner}: generator must be a Synthesizer class (ModelInversion, DataImpressions, "
                        f"AuxiliaryData, DeepInversion), a SynthesizerGenerator, RealReplay, or an object with "
                        f"generate() and describe(); got {generator!r}")
    return generator


def expert_name(expert) -> str:
    i = expert.meta.get("experience") if isinstance(getattr(expert, "meta", None), dict) else None
    return f"#{i} (classes {list(expert.classes)})" if i is not None else f"(classes {list(expert.classes)})"


# -- the interface ------------------------------------------------------------------------


class Strategy:
    """Base class: the bookkeeping every strategy shares.

    Subclasses implement :meth:`train` and :meth:`_logits`. The strategy
    records, per experience, the expert's classes and task label; with task
    labels (multi-task scenarios) :meth:`predict` restricts each sample's
    answer to its task's head, the union of the classes of that task's experts.
    """

    #: the name on the command line and in results
    name = "strategy"
    #: whether predict() needs task labels even in single-head scenarios (the Oracle)
    needs_task_labels = False
    #: whether the strategy respects the ExML constraints (no data, no past expert kept)
    ex_model = True

    def __init__(self, *, num_classes: int | None = None, device: torch.device | str | None = None,
                 seed: int = 0, progress: bool = True) -> None:
        owner = type(self).__name__
        self.num_classes = None if num_classes is None else _check_int(num_classes, "num_classes", owner)
        self.device = torch.device(device) if device is not None else None
        self.seed = _check_int(seed, "seed", owner, low=0)
        self.progress = bool(progress)
        self.experience_classes: list[tuple[int, ...]] = []
        self.experience_tasks: list[int | None] = []
        self.history: list[dict[str, Any]] = []

    # -- bookkeeping -----------------------------------------------------------------
    @property
    def experiences_seen(self) -> int:
        return len(self.experience_classes)

    @property
    def classes_seen(self) -> list[int]:
        return sorted({c for cls in self.experience_classes for c in cls})

    @property
    def multi_task(self) -> bool:
        return any(t is not None for t in self.experience_tasks)

    def _check_expert(self, expert) -> None:
        owner = type(self).__name__
        for attr in ("model", "classes", "num_classes", "task_id", "meta"):
            if not hasattr(expert, attr):
                raise TypeError(f"{owner}.train: expert must be an exml_fast.Expert; got {type(expert).__name__}")
        if self.num_classes is None:
            self.num_classes = expert.num_classes
        elif expert.num_classes != self.num_classes:
            raise ValueError(f"{owner}.train: expert {expert_name(expert)} has {expert.num_classes} outputs but "
                             f"this strategy learns {self.num_classes}")
        if not expert.classes or any(not 0 <= c < self.num_classes for c in expert.classes):
            raise ValueError(f"{owner}.train: expert classes must be a non-empty subset of [0, {self.num_classes}); "
                             f"got {list(expert.classes)}")
        if self.experience_tasks and (expert.task_id is None) != (self.experience_tasks[0] is None):
            raise ValueError(f"{owner}.train: experts must all have task labels (multi-task) or none; expert "
                             f"{expert_name(expert)} has task_id={expert.task_id!r}")

    def _record(self, expert, **info: Any) -> None:
        self.experience_classes.append(tuple(int(c) for c in expert.classes))
        self.experience_tasks.append(expert.task_id)
        self.history.append({"experience": self.experiences_seen - 1, **info})

    def task_heads(self, device=None) -> torch.Tensor | None:
        """(T, num_classes) bool: the units of each task label seen (None without task labels)."""
        if not self.multi_task:
            return None
        t = max(self.experience_tasks) + 1
        heads = torch.zeros(t, self.num_classes, dtype=torch.bool)
        for cls, task in zip(self.experience_classes, self.experience_tasks):
            heads[task, list(cls)] = True
        return heads.to(device) if device is not None else heads

    def _device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")

    # -- the interface -------------------------------------------------------------
    def train(self, expert) -> None:
        """Learns from one expert (one experience); the expert can be dropped afterwards."""
        raise NotImplementedError

    def _logits(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_classes) float logits (or log-probabilities) for inputs ``x`` (B, C, H, W).

        ``task_ids`` (B,) int64: the task label of each sample. Multi-task
        strategies restrict each row to its task's head (other units get
        ``-inf``); the Oracle needs them always (the experience index of each
        sample in single-head scenarios); others ignore them.
        """
        owner = type(self).__name__
        if self.experiences_seen == 0:
            raise RuntimeError(f"{owner}.predict: train on at least one expert first")
        dev = self._device()
        x = x.to(dev)
        if task_ids is not None:
            task_ids = task_ids.to(dev)
            if task_ids.shape != (x.shape[0],):
                raise ValueError(f"{owner}.predict: task_ids must have shape ({x.shape[0]},); got "
                                 f"{tuple(task_ids.shape)}")
        elif self.needs_task_labels or self.multi_task:
            raise ValueError(f"{owner}.predict: task_ids are needed ({'the oracle picks the expert by them' if self.needs_task_labels else 'multi-task heads'})")
        out = self._logits(x, task_ids).float()
        heads = self.task_heads(dev)
        if heads is not None:
            if int(task_ids.min()) < 0 or int(task_ids.max()) >= heads.shape[0]:
                raise ValueError(f"{owner}.predict: task_ids must lie in [0, {heads.shape[0]}) (the tasks seen)")
            out = out.masked_fill(~heads[task_ids], float("-inf"))
        return out

    def config(self) -> dict[str, Any]:
        """The settings that decide the results (JSON-able; a resumed run must match them), and whether the
        strategy is ex-model (``ex_model``)."""
        return {"strategy": self.name, "seed": self.seed, "ex_model": bool(self.ex_model)}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "experience_classes": self.experience_classes,
                "experience_tasks": self.experience_tasks, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state is of strategy "
                             f"{state.get('name')!r}, not {self.name!r}")
        self.num_classes = state["num_classes"]
        self.experience_classes = [tuple(c) for c in state["experience_classes"]]
        self.experience_tasks = list(state["experience_tasks"])
        self.history = list(state["history"])


# -- Ex-Model Distillation --------------------------------------------------------------


#: ED's name by data source (the paper's Model Inversion ED, Data Impression ED, Aux. Data ED, Replay ED).
_ED_NAMES = {"model-inversion": "mi-ed", "data-impressions": "di-ed", "auxiliary": "aux-ed",
             "real-replay": "replay-ed", "deepinversion": "deepinversion-ed"}


class ExModelDistillation(Strategy):
    """Ex-Model Distillation (ED, the ExML paper's Algorithm 1).

    For the i-th expert (i from 1):

    1. ``generator`` makes ``buffer_size // i`` samples of the expert's classes;
    2. the buffer keeps a class-balanced subsample of its old content so that
       old plus new fit ``buffer_size`` (:class:`~exml_fast.cl.buffer.SyntheticBuffer`);
    3. for ``iterations`` SGD steps on minibatches of ``batch_size`` drawn from
       the buffer (augmented per sample), ``model`` minimises
       ``L_ED = ||f(x) − ỹ||² + λ_CE · CE(f(x), y)`` (:func:`exml_fast.ops.ed_loss`),
       where the target ``ỹ`` combines the normalised logits of the expert on
       its classes and of a frozen copy of ``model`` taken before the
       experience on the classes seen before (``target_mode``, ``normalize``).

    Multi-task streams (experts with task labels): each sample's target and
    loss are restricted to its task's head.

    Args:
        model: the learner, (B, C, H, W) → (B, num_classes) logits; trained in
            place (on its own device unless ``device`` is given) and available as
            ``strategy.model``.
        generator: where samples come from: a synthesizer class
            (:class:`~exml_fast.synth.ModelInversion`,
            :class:`~exml_fast.synth.DataImpressions`,
            :class:`~exml_fast.synth.AuxiliaryData` (pass ``data=`` in
            ``generator_options``), :class:`~exml_fast.synth.DeepInversion`),
            a :class:`SynthesizerGenerator`, or :class:`RealReplay` (Replay ED).
        generator_options: keyword arguments for the synthesizer class.
        buffer_size: N, the buffer capacity (the paper: 5000).
        iterations: distillation steps per experience (MNIST: 30000).
        lr, momentum, weight_decay: SGD (a fresh optimiser per experience); momentum 0
            by default, as in the paper's reference code (plain SGD).
        batch_size: distillation minibatch (32).
        temperature: τ of the generator's loss (MI cross-entropy, DI soft
            targets) when it is built from a class and the options do not set
            one; None: the synthesizer's default. The ED loss has none (Eq. 9-10).
        lambda_ce, target_mode, normalize: of :func:`exml_fast.ops.ed_loss`
            ("slice" — the reference code — or "per_sample" — the paper, Eq. 8;
            "none", "center", "standardize").
        augment, pad_crop, max_shift, flip: per-sample augmentation of each
            minibatch (MNIST: pad-crop 4); padding takes the normalised black
            of the expert's ``mean``/``std`` when known (else 0).
        seed: every draw of experience i (synthesis, buffer subsampling,
            minibatches, augmentation) is seeded from (seed, i), so a run
            resumed after experience i equals an uninterrupted one.
        device: where the learner, experts and synthesis run (None: the
            model's device).
        progress: tqdm bars for synthesis and distillation.
    """

    #: "mi-ed", "di-ed", "aux-ed", "replay-ed" (set from the generator's method)
    name = "ed"

    @property
    def ex_model(self) -> bool:
        """Whether this run respects the ExML constraints: False with real data of the experiences
        (:class:`RealReplay`, the paper's Replay ED, an upper bound), True with synthesizers or auxiliary
        data. A data source says so by its ``ex_model`` attribute (True when it has none)."""
        return bool(getattr(self.generator, "ex_model", True))

    def __init__(
        self,
        model: nn.Module,
        *,
        generator,
        generator_options: dict[str, Any] | None = None,
        buffer_size: int = 5000,
        iterations: int = 30000,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        temperature: float | None = None,
        lambda_ce: float = 1.0,
        target_mode: str = "slice",
        normalize: str = "center",
        augment: bool = True,
        pad_crop: int = 4,
        max_shift: int = 0,
        flip: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        from exml_fast.reference.ed_loss import NORMALIZE_MODES, TARGET_MODES

        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module; got {type(model).__name__}")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else "cpu"
        super().__init__(device=device, seed=seed, progress=progress)
        if temperature is not None:
            temperature = _check_float(temperature, "temperature", owner, positive=True)
            if isinstance(generator, type) and issubclass(generator, Synthesizer) \
                    and not issubclass(generator, AuxiliaryData):
                generator_options = {"temperature": temperature, **(generator_options or {})}
        self.generator = _as_generator(generator, generator_options, owner)
        method = self.generator.describe().get("method")
        self.name = _ED_NAMES.get(method, f"{method}-ed")
        self.model = model.to(self.device)
        self.buffer = SyntheticBuffer(_check_int(buffer_size, "buffer_size", owner))
        self.iterations = _check_int(iterations, "iterations", owner)
        self.lr = _check_float(lr, "lr", owner, positive=True)
        self.momentum = _check_float(momentum, "momentum", owner)
        self.weight_decay = _check_float(weight_decay, "weight_decay", owner)
        self.batch_size = _check_int(batch_size, "batch_size", owner)
        self.temperature = temperature
        self.lambda_ce = _check_float(lambda_ce, "lambda_ce", owner)
        if target_mode not in TARGET_MODES:
            raise ValueError(f"{owner}: target_mode must be one of {TARGET_MODES}; got {target_mode!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"{owner}: normalize must be one of {NORMALIZE_MODES}; got {normalize!r}")
        self.target_mode, self.normalize = target_mode, normalize
        self.augment = bool(augment)
        self.pad_crop = _check_int(pad_crop, "pad_crop", owner, low=0)
        self.max_shift = _check_int(max_shift, "max_shift", owner, low=0)
        self.flip = bool(flip)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "generator": self.generator.describe(), "buffer_size": self.buffer.capacity,
                "iterations": self.iterations, "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size, "temperature": self.temperature,
                "lambda_ce": self.lambda_ce, "target_mode": self.target_mode, "normalize": self.normalize,
                "augment": self.augment, "pad_crop": self.pad_crop, "max_shift": self.max_shift, "flip": self.flip}

    def train(self, expert) -> None:
        """One experience: synthesise ``N/i`` samples from ``expert``, update the buffer, distil."""
        self._check_expert(expert)
        i = self.experiences_seen + 1
        dev = self._device()
        expert_model = expert.model.to(dev).eval()

        t0 = time.perf_counter()
        extra = {}
        if i > 1 and "learner" in inspect.signature(self.generator.generate).parameters:
            extra["learner"] = self.model
        batch = self.generator.generate(expert, self.buffer.quota(i), seed=derive_seed(self.seed, "generate", i),
                                        device=dev, progress=self.progress, **extra)
        t_gen = time.perf_counter() - t0
        outside = set(torch.unique(batch.y).tolist()) - set(expert.classes)
        if outside:
            raise ValueError(f"{type(self).__name__}.train: the generator ({self.generator.describe().get('method')}) "
                             f"labelled samples with classes {sorted(outside)} outside expert "
                             f"{expert_name(expert)}'s classes")
        soft = None if batch.soft_targets is None else batch.soft_targets.detach().float().cpu()
        self.buffer.update(batch.x.detach().float().cpu(), batch.y.cpu(), experience=i - 1, soft_targets=soft,
                           generator=torch.Generator().manual_seed(derive_seed(self.seed, "buffer", i)))
        gen_stats = {k: float(v.float().mean()) for k, v in batch.losses.items() if v.numel()}
        del batch, soft

        prev = _frozen_copy(self.model) if i > 1 else None
        t0 = time.perf_counter()
        loss = self._distill(expert_model, expert, prev, i)
        t_distill = time.perf_counter() - t0
        del prev, expert_model
        self._record(expert, generated=self.buffer.quota(i), buffer=len(self.buffer), final_loss=loss,
                     generate_s=round(t_gen, 3), distill_s=round(t_distill, 3), generator_stats=gen_stats)

    def _fill(self, expert) -> float | torch.Tensor:
        if expert.mean is None or expert.std is None:
            return 0.0
        m = torch.tensor(expert.mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(expert.std, dtype=torch.float32).view(1, -1, 1, 1)
        return ((0.0 - m) / s).to(self._device())

    def _distill(self, expert_model: nn.Module, expert, prev: nn.Module | None, i: int) -> float:
        from exml_fast.ops import ed_loss

        dev = self._device()
        prev_classes = self.classes_seen
        expert_classes = torch.tensor(sorted(expert.classes), dtype=torch.int64, device=dev)
        prev_t = torch.tensor(prev_classes, dtype=torch.int64, device=dev) if prev is not None else None
        heads = task_of = None
        if expert.task_id is not None:
            tasks = self.experience_tasks + [expert.task_id]
            heads = torch.zeros(max(tasks) + 1, self.num_classes, dtype=torch.bool)
            for cls, t in zip(self.experience_classes + [tuple(expert.classes)], tasks):
                heads[t, list(cls)] = True
            heads = heads.to(dev)
            task_of = torch.tensor(tasks, dtype=torch.int64)
        fill = self._fill(expert)

        gen = torch.Generator().manual_seed(derive_seed(self.seed, "distill", i))
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        bx, by, bexp = self.buffer.x, self.buffer.y, self.buffer.experience
        # Buffer labels come from the generators (the expert's classes) or from earlier experiences, so
        # ed_loss's per-step label check (a host sync on CUDA) is skipped.
        bar = Progress(self.iterations, f"distil {i}", self.progress)
        running, seen, every = torch.zeros((), device=dev), 0, max(1, min(100, self.iterations // 20))
        last = float("nan")
        self.model.train()
        try:
            for step in range(self.iterations):
                idx = self.buffer.sample(self.batch_size, generator=gen)
                xb = bx[idx].to(dev, non_blocking=True)
                yb = by[idx].to(dev, non_blocking=True)
                if self.augment and (self.pad_crop or self.max_shift or self.flip):
                    xb = augment_batch(xb, gen, pad_crop=self.pad_crop, max_shift=self.max_shift, flip=self.flip,
                                       fill=fill)
                with torch.no_grad():
                    e_logits = expert_model(xb)
                    p_logits = prev(xb) if prev is not None else None
                logits = self.model(xb)
                loss = ed_loss(logits, yb, expert_logits=e_logits, expert_classes=expert_classes,
                               prev_logits=p_logits, prev_classes=prev_t, target_mode=self.target_mode,
                               normalize=self.normalize, lambda_ce=self.lambda_ce,
                               task_ids=None if task_of is None else task_of[bexp[idx]].to(dev),
                               task_heads=heads, check_labels=False)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.detach()
                seen += 1
                if seen == every or step + 1 == self.iterations:
                    last = float(running) / seen  # one host sync per `every` steps
                    bar.update(seen, {"loss": last})
                    running.zero_()
                    seen = 0
        finally:
            bar.close()
            self.model.eval()
        return last

    @torch.no_grad()
    def _logits(self, x, task_ids):
        self.model.eval()
        return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "model": self.model.state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.model.load_state_dict(state["model"])
        self.buffer.load_state_dict(state["buffer"])


# -- baselines ------------------------------------------------------------------------------


class _ExpertEnsemble(Strategy):
    """Keeps every expert's model (frozen, on the strategy's device): not an ex-model strategy."""

    ex_model = False

    def __init__(self, *, device: torch.device | str | None = None, seed: int = 0, progress: bool = True) -> None:
        super().__init__(device=device, seed=seed, progress=progress)
        self.experts: list[nn.Module] = []
        self._specs: list[dict[str, Any]] = []

    def train(self, expert) -> None:
        self._check_expert(expert)
        for key in ("arch", "arch_kwargs"):
            if not hasattr(expert, key):
                raise TypeError(f"{type(self).__name__}.train: expert must be an exml_fast.Expert (with {key})")
        self.experts.append(_frozen_copy(expert.model).to(self._device()))
        self._specs.append({"arch": expert.arch, "arch_kwargs": dict(expert.arch_kwargs)})
        self._record(expert)

    def _all_logits(self, x) -> torch.Tensor:
        """(E, B, K) float logits of every expert."""
        return torch.stack([m(x).float() for m in self.experts])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "experts": [
            {**spec, "state_dict": m.state_dict()} for spec, m in zip(self._specs, self.experts)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from exml_fast.models import build_model

        super().load_state_dict(state)
        self.experts, self._specs = [], []
        for e in state["experts"]:
            m = build_model(e["arch"], **e["arch_kwargs"])
            m.load_state_dict(e["state_dict"])
            self.experts.append(_frozen_copy(m).to(self._device()))
            self._specs.append({"arch": e["arch"], "arch_kwargs": e["arch_kwargs"]})


class OracleEnsemble(_ExpertEnsemble):
    """The paper's Oracle: the task label of a sample (its experience) picks the expert.

    The answer is the expert's logits on its own classes and ``-inf``
    elsewhere. ``predict`` needs ``task_ids``: the task label in multi-task
    streams, else the index of the experience the sample comes from.
    """

    name = "oracle"
    needs_task_labels = True

    def _logits(self, x, task_ids):
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), device=x.device)
        keys = self.experience_tasks if self.multi_task else list(range(self.experiences_seen))
        known = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for key, model, cls in zip(keys, self.experts, self.experience_classes):
            rows = (task_ids == key).nonzero().flatten()
            if rows.numel():
                known[rows] = True
                cols = torch.tensor(cls, device=x.device)
                out[rows[:, None], cols[None, :]] = model(x[rows]).float()[:, cols]
        if not bool(known.all()):
            raise ValueError(f"OracleEnsemble.predict: some task_ids name no expert seen (known: {keys})")
        return out


class EnsembleAverage(_ExpertEnsemble):
    """The mean of the experts' softmax outputs (returned as log-probabilities)."""

    name = "ensemble-avg"

    def _logits(self, x, task_ids):
        return torch.logsumexp(torch.log_softmax(self._all_logits(x), -1), 0) - math.log(len(self.experts))


class MinEntropyEnsemble(_ExpertEnsemble):
    """Per sample, the expert whose softmax has the lowest entropy answers (its logits)."""

    name = "min-entropy"

    def _logits(self, x, task_ids):
        logits = self._all_logits(x)                       # (E, B, K)
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)             # (E, B)
        best = entropy.argmin(0)                           # (B,)
        return logits[best, torch.arange(x.shape[0], device=x.device)]


class ParameterAverage(Strategy):
    """The running mean of the experts' parameters and buffers: one model in memory.

    After i experts the model holds ``θ̄_i = θ̄_{i-1} + (θ_i − θ̄_{i-1}) / i``
    (every floating-point parameter and buffer, BatchNorm statistics
    included; integer buffers such as ``num_batches_tracked`` take the
    latest expert's value). All experts need the same architecture.

    Args:
        model: None (a copy of the first expert's model becomes the average)
            or a model of the experts' architecture to hold the average.
    """

    name = "param-avg"

    def __init__(self, model: nn.Module | None = None, *, device: torch.device | str | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"ParameterAverage: model must be an nn.Module or None; got {type(model).__name__}")
        if device is None and model is not None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else None
        super().__init__(device=device, seed=seed, progress=progress)
        self.model = model
        self._spec: dict[str, Any] | None = None

    def train(self, expert) -> None:
        self._check_expert(expert)
        dev = self._device()
        new = expert.model.state_dict()
        if self.model is None:
            self.model = _frozen_copy(expert.model).to(dev)
        own = self.model.state_dict()
        if own.keys() != new.keys():
            diff = sorted(set(own) ^ set(new))[:5]
            raise ValueError(f"ParameterAverage.train: expert {expert_name(expert)} has a different architecture "
                             f"(entries not in both: {diff})")
        for k, v in own.items():
            if v.shape != new[k].shape:
                raise ValueError(f"ParameterAverage.train: expert {expert_name(expert)} has {k} of shape "
                                 f"{tuple(new[k].shape)}, the average {tuple(v.shape)}")
        i = self.experiences_seen + 1
        with torch.no_grad():
            for k, v in own.items():
                w = new[k].to(v.device)
                if i == 1 or not v.is_floating_point():
                    v.copy_(w)
                else:
                    v.add_(w.to(v.dtype) - v, alpha=1.0 / i)
        self._spec = {"arch": getattr(expert, "arch", None), "arch_kwargs": dict(getattr(expert, "arch_kwargs", {}))}
        self._record(expert)

    @torch.no_grad()
    def _logits(self, x, task_ids):
        self.model.eval()
        return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "spec": self._spec,
                "model": None if self.model is None else self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from exml_fast.models import build_model

        super().load_state_dict(state)
        self._spec = state["spec"]
        if state["model"] is None:
            return
        if self.model is None:
            self.model = _frozen_copy(build_model(self._spec["arch"], **self._spec["arch_kwargs"])).to(self._device())
        self.model.load_state_dict(state["model"])


#: Strategy classes by their command-line name.
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (ExModelDistillation, OracleEnsemble, EnsembleAverage, MinEntropyEnsemble,
                              ParameterAverage)
}
