"""What every strategy shares: the :class:`Strategy` interface and its bookkeeping, seeds, frozen copies."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_float, check_int
from exml_fast._utils.provenance import derive_seed as _derive
from exml_fast.cl.heads import task_head_mask

__all__ = ["Strategy", "check_float", "check_int", "derive_seed", "expert_name", "frozen_copy"]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and a tag (e.g. ``("generate", 3)``): independent streams per use."""
    return _derive("exml_fast.strategies", seed, *parts)


def frozen_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def expert_name(expert) -> str:
    i = expert.meta.get("experience") if isinstance(getattr(expert, "meta", None), dict) else None
    return f"#{i} (classes {list(expert.classes)})" if i is not None else f"(classes {list(expert.classes)})"


class Strategy:
    """Base class: the interface of every strategy and the bookkeeping they share.

    The life cycle a run drives (:func:`exml_fast.cl.engine.run_stream`), and the public hooks a subclass
    writes:

    - :meth:`train` ``(experience)`` — learn one experience: an expert (ExML, ``learns_from = "experts"``) or
      a scenario's experience with its training data (``learns_from = "data"``; subclass
      :class:`~exml_fast.cl.strategies.cil_base.DataStrategy`, which splits training into finer hooks).
    - :meth:`logits` ``(x, task_ids)`` — the (B, num_classes) answer for inputs ``x``, read by
      :meth:`predict` (which adds the checks and the task heads).
    - :meth:`config` — the settings that decide the results (a resumed run must match them).
    - :meth:`state_dict` / :meth:`load_state_dict` — what a checkpoint keeps between experiences; call
      ``super()`` and add your own entries.

    The strategy records, per experience, the expert's classes and task label; with task labels (multi-task
    scenarios) :meth:`predict` restricts each sample's answer to its task's head, the union of the classes of
    that task's experts.

    Hooks written under their former underscore names (``_logits``; DataStrategy's ``_begin``, ``_loss``, ...,
    see :attr:`LEGACY_HOOKS`) still work: a subclass's method under either name answers for both.
    """

    #: the name on the command line and in results
    name = "strategy"
    #: whether predict() needs task labels even in single-head scenarios (the Oracle)
    needs_task_labels = False
    #: whether the strategy respects the ExML constraints (no data, no past expert kept)
    ex_model = True
    #: what :meth:`train` takes: "experts" (ExML) or "data" (a scenario's experience with its training data)
    learns_from = "experts"
    #: whether real data of past experiences is kept after they are learned (shown beside every result)
    keeps_data = False
    #: settings added to :meth:`config` after runs were recorded, with the value those runs had: a checkpoint
    #: of this strategy written before lacks them and resumes as that setting (exml_fast.cl.engine.run_stream)
    config_added: dict[str, Any] = {}
    #: training over ``torch.distributed`` ranks (:mod:`exml_fast.cl.parallel`): None, when a default process
    #: group of more than one rank is initialised (torchrun); False, never (each rank alone); True, required
    distributed: bool | None = None
    #: former underscore hook names -> their public names: a subclass defining one name gets the other too
    LEGACY_HOOKS: dict[str, str] = {"_logits": "logits"}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Makes each hook's two names one method: the one defined nearest in the MRO (mixins included)."""
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        for old, new in cls.LEGACY_HOOKS.items():
            k_old = next((k for k in mro if old in k.__dict__), None)
            k_new = next((k for k in mro if new in k.__dict__), None)
            if k_old is k_new:
                continue
            if k_new is None or (k_old is not None and mro.index(k_old) < mro.index(k_new)):
                setattr(cls, new, k_old.__dict__[old])
            else:
                setattr(cls, old, k_new.__dict__[new])

    def __init__(self, *, num_classes: int | None = None, device: torch.device | str | None = None,
                 seed: int = 0, progress: bool = True) -> None:
        owner = type(self).__name__
        self.num_classes = None if num_classes is None else check_int(num_classes, "num_classes", owner, low=1)
        self.device = torch.device(device) if device is not None else None
        self.seed = check_int(seed, "seed", owner, low=0)
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
        heads = task_head_mask(self.experience_classes, self.experience_tasks, self.num_classes)
        return heads.to(device) if device is not None else heads

    def _device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")

    # -- the interface -------------------------------------------------------------
    def train(self, expert) -> None:
        """Learns from one expert (one experience); the expert can be dropped afterwards."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, num_classes) logits (or log-probabilities) for ``x`` (B, C, H, W) on the strategy's device;
        ``task_ids`` (B,) int64 or None, as :meth:`predict` got them. :meth:`predict` calls it under
        ``torch.no_grad()`` after at least one experience."""
        raise NotImplementedError

    _logits = logits  # the former name, for subclasses that call super()._logits

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
            why = "the oracle picks the expert by them" if self.needs_task_labels else "multi-task heads"
            raise ValueError(f"{owner}.predict: task_ids are needed ({why})")
        out = self.logits(x, task_ids).float()
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
