"""Continual-learning scenarios (streams of experiences) and the training of one expert per experience.

A :class:`Scenario` splits a dataset's classes into experiences. The class order
is a permutation of the classes drawn from ``seed`` (every seed, 0 included, is a
seeded permutation: ``torch.randperm(num_classes, generator=Generator().manual_seed(seed))``);
experience i gets the next consecutive block of that order. When ``n_experiences``
does not divide the number of classes the remainder is distributed: the first
``num_classes % n_experiences`` experiences get one class more (10 classes in 3
experiences: 4, 3, 3). With ``base_classes=B`` (the SKD and PyCIL protocols, e.g.
"B50 Inc10" on CIFAR-100) the first experience takes the first B classes of the order
and the other ``n_experiences - 1`` share the rest as above. Within an experience the
classes are stored sorted.

- class-incremental (NC) scenarios: no task labels (``task_id`` None); an expert
  is trained with cross-entropy over all ``num_classes`` outputs.
- multi-task (MT, ``*_mt``): ``task_id`` = experience index; the head of task t is
  the output units of its classes, and an expert is trained with cross-entropy
  over its head only (:meth:`Scenario.task_heads`).

Images: MNIST / Fashion-MNIST zero-padded to 32x32 and normalised with the
dataset's mean and std (:func:`exml_fast.data.mnist_tensors`); CIFAR-10 and
CIFAR-100 (its 100 fine labels) from the python pickles, normalised per channel
(:func:`exml_fast.data.cifar_tensors`).
Joint MNIST is one experience holding all ten classes and the full 60000-image training set (the paper reports 50000
training samples, i.e. it held out a validation split; pass
``max_train_per_experience=50000`` for that size).

:func:`train_experts` writes one expert per experience as an expert stream; each
expert is trained by :func:`exml_fast.training.experts.train_expert`.

Example::

    scenario = make_scenario("split_mnist", n_experiences=5, seed=0)
    stream = train_experts(scenario, "runs/split_mnist_s0", arch="lenet5")   # resumable
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from exml_fast._utils.checks import check_choice, check_int
from exml_fast.cl.experts import Expert, ExpertStream
from exml_fast.cl.heads import task_head_mask
from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.data.cifar import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CIFAR_LAYOUTS,
                                  cifar_tensors)
from exml_fast.models import ARCHS
from exml_fast.synth.base import batch_seed
from exml_fast.training.experts import (check_sgd_settings, default_expert_epochs, expert_accuracy,
                                        init_expert_model, train_expert)

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD", "EVAL_SPLITS", "Experience", "SCENARIOS",
           "Scenario", "class_order", "default_expert_epochs", "joint_mnist", "make_scenario", "scenario_of",
           "split_cifar10", "split_cifar100", "split_fashion_mnist", "split_mnist", "train_experts",
           "validation_indices"]

# ------------------------------------------------------------------------------------------- the containers


@dataclass(frozen=True, eq=False)
class Experience:
    """One experience of a scenario: its classes and its data (already normalised).

    Attributes:
        index: position in the stream (0-based).
        classes: the classes (= output units) of this experience, sorted.
        task_id: the task label (multi-task scenarios: ``index``), or None.
        train_x: (N, C, H, W) float32, normalised; train_y: (N,) int64 global class indices.
        test_x, test_y: likewise for the test split.
    """

    index: int
    classes: tuple[int, ...]
    task_id: int | None
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0] or y.dtype != torch.int64:
                raise ValueError(f"Experience {self.index}: {split}_x must be (N, C, H, W) and {split}_y (N,) "
                                 f"int64; got {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


@dataclass(eq=False)
class Scenario:
    """A stream of experiences over one dataset (see the module docstring for how classes are split).

    Attributes:
        name: a key of :data:`SCENARIOS` ("split_mnist", "split_mnist_mt", "joint_mnist", ...).
        dataset: "mnist" | "fashion-mnist" | "cifar10" | "cifar100".
        num_classes: outputs of every expert (all of the dataset's classes).
        input_shape: (C, H, W) of one image.
        mean, std: per-channel normalisation of pixels in [0, 1].
        multi_task: task labels given; each task's head is its classes' units.
        seed: the seed of the class order.
        class_order: the permutation of the classes that the experiences follow.
        experiences: the experiences, in stream order.
        options: further factory arguments (sample caps), so that ``make_scenario(name,
            **describe()["kwargs"])`` rebuilds the scenario.
    """

    name: str
    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    multi_task: bool
    seed: int
    class_order: tuple[int, ...]
    experiences: list[Experience]
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    def __iter__(self):
        return iter(self.experiences)

    def __repr__(self) -> str:
        return (f"Scenario({self.name!r}, {self.dataset}, {len(self)} experience(s), classes per experience "
                f"{[e.classes for e in self.experiences]}, multi_task={self.multi_task}, seed={self.seed})")

    def describe(self) -> dict[str, Any]:
        """A JSON-able description without data: every field but the tensors, and per experience its
        index, classes, task_id and train/test sizes. ``"kwargs"`` rebuilds it with :func:`make_scenario`."""
        return {
            "name": self.name,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "multi_task": self.multi_task,
            "seed": self.seed,
            "class_order": list(self.class_order),
            "kwargs": {"n_experiences": len(self), "seed": self.seed, **copy.deepcopy(self.options)},
            "experiences": [{"index": e.index, "classes": list(e.classes), "task_id": e.task_id,
                             "train_size": e.num_train, "test_size": e.num_test} for e in self.experiences],
        }

    def task_heads(self) -> torch.Tensor | None:
        """(T, num_classes) bool: row t marks the output units of task t's head; None unless multi-task."""
        if not self.multi_task:
            return None
        return task_head_mask([e.classes for e in self.experiences], [e.task_id for e in self.experiences],
                              self.num_classes)

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The union of the test sets in experience order: x (N, C, H, W), y (N,) int64 and the
        experience index of each sample (N,) int64 (= its task label in multi-task scenarios)."""
        xs = [e.test_x for e in self.experiences]
        ys = [e.test_y for e in self.experiences]
        ids = [torch.full((e.num_test,), e.index, dtype=torch.int64) for e in self.experiences]
        return torch.cat(xs), torch.cat(ys), torch.cat(ids)


# ---------------------------------------------------------------------------------------- building scenarios




def class_order(num_classes: int, seed: int) -> tuple[int, ...]:
    """The seeded class permutation of every scenario: ``randperm(num_classes)`` drawn from
    ``torch.Generator().manual_seed(seed)``."""
    return tuple(torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist())


def _partition(order: tuple[int, ...], n_experiences: int, base_classes: int | None = None) -> list[tuple[int, ...]]:
    """Consecutive blocks of ``order``; the first ``len(order) % n`` blocks get one class more. With
    ``base_classes`` the first block is the first ``base_classes`` classes and the rest is split so over
    ``n_experiences - 1`` blocks."""
    if base_classes is not None:
        return [tuple(sorted(order[:base_classes])), *_partition(order[base_classes:], n_experiences - 1)]
    base, extra = divmod(len(order), n_experiences)
    blocks, start = [], 0
    for i in range(n_experiences):
        size = base + (1 if i < extra else 0)
        blocks.append(tuple(sorted(order[start:start + size])))
        start += size
    return blocks


def _select(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], cap: int | None):
    """The samples of ``classes`` in file order, the first ``cap`` of them when given (copies)."""
    idx = torch.isin(y, torch.tensor(classes, dtype=y.dtype)).nonzero().flatten()
    if cap is not None:
        idx = idx[:cap]
    return x[idx].contiguous(), y[idx].contiguous()


def _build(name: str, dataset: str, *, train, test, num_classes: int, mean, std, n_experiences: int, seed: int,
           multi_task: bool, max_train_per_experience: int | None, max_test_per_experience: int | None,
           validation_size: int | None = None, eval_split: str = "test", base_classes: int | None = None,
           owner: str) -> Scenario:
    check_int(n_experiences, "n_experiences", owner, low=1, high=num_classes)
    check_int(seed, "seed", owner, low=0)
    if base_classes is not None:
        if n_experiences < 2:
            raise ValueError(f"{owner}: base_classes needs n_experiences >= 2 (a base task, then the others); "
                             f"got n_experiences={n_experiences}")
        check_int(base_classes, "base_classes", owner, low=1, high=num_classes - (n_experiences - 1))
    for cap_name, cap in (("max_train_per_experience", max_train_per_experience),
                          ("max_test_per_experience", max_test_per_experience)):
        if cap is not None:
            check_int(cap, cap_name, owner, low=1)
    train, test = _split_validation(train, test, validation_size, eval_split, owner)
    order = class_order(num_classes, seed)
    experiences = []
    for i, classes in enumerate(_partition(order, n_experiences, base_classes)):
        tx, ty = _select(*train, classes, max_train_per_experience)
        vx, vy = _select(*test, classes, max_test_per_experience)
        experiences.append(Experience(index=i, classes=classes, task_id=i if multi_task else None,
                                      train_x=tx, train_y=ty, test_x=vx, test_y=vy))
    options = {k: v for k, v in (("max_train_per_experience", max_train_per_experience),
                                 ("max_test_per_experience", max_test_per_experience),
                                 ("validation_size", validation_size), ("base_classes", base_classes))
               if v is not None}
    if eval_split != "test":
        options["eval_split"] = eval_split
    return Scenario(name=name, dataset=dataset, num_classes=num_classes, input_shape=tuple(train[0].shape[1:]),
                    mean=tuple(mean), std=tuple(std), multi_task=multi_task, seed=seed, class_order=order,
                    experiences=experiences, options=options)


#: The seed of the fixed draw of held-out validation images (:func:`validation_indices`).
VALIDATION_SEED = 20260
EVAL_SPLITS = ("test", "validation")


def validation_indices(n: int, size: int) -> torch.Tensor:
    """The sorted indices of the ``size`` training images held out for validation among ``n``: the first
    ``size`` of ``randperm(n)`` drawn from ``Generator().manual_seed(VALIDATION_SEED)``, the same for every
    scenario seed, so no expert of any stream trains on them."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return perm[:size].sort().values


def _split_validation(train, test, validation_size: int | None, eval_split: str, owner: str):
    """(train, evaluation) pairs: training data without the held-out images, and the test set or the
    held-out images (``eval_split``)."""
    check_choice(eval_split, "eval_split", owner, EVAL_SPLITS)
    if validation_size is None:
        if eval_split == "validation":
            raise ValueError(f"{owner}: eval_split='validation' needs validation_size (images held out of "
                             "the training set); got None")
        return train, test
    n = int(train[1].shape[0])
    check_int(validation_size, "validation_size", owner, low=1, high=n - 1)
    held = torch.zeros(n, dtype=torch.bool)
    held[validation_indices(n, validation_size)] = True
    kept = (train[0][~held], train[1][~held])
    return kept, ((train[0][held], train[1][held]) if eval_split == "validation" else test)


def _mnist_like(dataset: str, name: str, *, n_experiences: int, seed: int, root, multi_task: bool,
                max_train_per_experience: int | None, max_test_per_experience: int | None,
                validation_size: int | None, eval_split: str, base_classes: int | None = None) -> Scenario:
    owner = name
    check_int(n_experiences, "n_experiences", owner, low=1, high=10)
    train = mnist_tensors("train", dataset=dataset, pad_to=32, normalize=True, root=root)
    test = mnist_tensors("test", dataset=dataset, pad_to=32, normalize=True, root=root)
    mean, std = DATASET_STATS[dataset]
    return _build(name, dataset, train=train, test=test, num_classes=10, mean=(mean,), std=(std,),
                  n_experiences=n_experiences, seed=seed, multi_task=multi_task,
                  max_train_per_experience=max_train_per_experience,
                  max_test_per_experience=max_test_per_experience, validation_size=validation_size,
                  eval_split=eval_split, base_classes=base_classes, owner=owner)


def split_mnist(n_experiences: int = 5, *, seed: int = 0, root: str | os.PathLike | None = None,
                multi_task: bool = False, max_train_per_experience: int | None = None,
                max_test_per_experience: int | None = None, validation_size: int | None = None,
                eval_split: str = "test", base_classes: int | None = None) -> Scenario:
    """Split MNIST: the 10 digits in ``n_experiences`` experiences (5: two classes each), 32x32 images.

    Args:
        n_experiences: 1 to 10 (remainders distributed, see the module docstring).
        seed: the class order's seed (>= 0).
        root: the MNIST folder (see :func:`exml_fast.data.load_mnist`); None searches the usual places.
        multi_task: task labels and per-task heads (the "split_mnist_mt" scenario).
        max_train_per_experience, max_test_per_experience: keep only the first that many samples
            of each experience (file order), e.g. for quick runs; None keeps all.
        validation_size: hold this many training images out of every experience's training data
            (a fixed draw, the same for every seed: :func:`validation_indices`); None holds none out.
        eval_split: "test" (the test set) or "validation" (the held-out training images, which needs
            ``validation_size``) becomes each experience's ``test_x`` / ``test_y``, so that everything
            evaluated on a scenario — the run loop, the metrics — can select hyperparameters on
            validation data without touching the test set.
        base_classes: the first experience takes this many classes of the order, the others share the
            rest (needs ``n_experiences >= 2``); None splits all classes evenly.
    """
    return _mnist_like("mnist", "split_mnist_mt" if multi_task else "split_mnist", n_experiences=n_experiences,
                       seed=seed, root=root, multi_task=multi_task,
                       max_train_per_experience=max_train_per_experience,
                       max_test_per_experience=max_test_per_experience, validation_size=validation_size,
                       eval_split=eval_split, base_classes=base_classes)


def split_fashion_mnist(n_experiences: int = 5, *, seed: int = 0, root: str | os.PathLike | None = None,
                        multi_task: bool = False, max_train_per_experience: int | None = None,
                        max_test_per_experience: int | None = None, validation_size: int | None = None,
                        eval_split: str = "test", base_classes: int | None = None) -> Scenario:
    """Split Fashion-MNIST, as :func:`split_mnist`."""
    return _mnist_like("fashion-mnist", "split_fashion_mnist_mt" if multi_task else "split_fashion_mnist",
                       n_experiences=n_experiences, seed=seed, root=root, multi_task=multi_task,
                       max_train_per_experience=max_train_per_experience,
                       max_test_per_experience=max_test_per_experience, validation_size=validation_size,
                       eval_split=eval_split, base_classes=base_classes)


def joint_mnist(*, seed: int = 0, root: str | os.PathLike | None = None,
                max_train_per_experience: int | None = None,
                max_test_per_experience: int | None = None, validation_size: int | None = None,
                eval_split: str = "test") -> Scenario:
    """Joint MNIST: one experience with all 10 classes and all 60000 training images (see the module docstring);
    ``validation_size`` and ``eval_split`` as in :func:`split_mnist`."""
    return _mnist_like("mnist", "joint_mnist", n_experiences=1, seed=seed, root=root, multi_task=False,
                       max_train_per_experience=max_train_per_experience,
                       max_test_per_experience=max_test_per_experience, validation_size=validation_size,
                       eval_split=eval_split)


# ------------------------------------------------------------------------------------------ CIFAR-10 / -100


def _split_cifar(dataset: str, name: str, *, n_experiences: int, seed: int, root, multi_task: bool,
                 max_train_per_experience, max_test_per_experience, validation_size, eval_split: str,
                 base_classes) -> Scenario:
    layout = CIFAR_LAYOUTS[dataset]
    check_int(n_experiences, "n_experiences", name, low=1, high=layout.num_classes)
    train = cifar_tensors("train", dataset=dataset, root=root)
    test = cifar_tensors("test", dataset=dataset, root=root)
    return _build(name, dataset, train=train, test=test, num_classes=layout.num_classes, mean=layout.mean,
                  std=layout.std, n_experiences=n_experiences, seed=seed, multi_task=multi_task,
                  max_train_per_experience=max_train_per_experience,
                  max_test_per_experience=max_test_per_experience, validation_size=validation_size,
                  eval_split=eval_split, base_classes=base_classes, owner=name)


def split_cifar10(n_experiences: int = 5, *, seed: int = 0, root: str | os.PathLike | None = None,
                  multi_task: bool = False, max_train_per_experience: int | None = None,
                  max_test_per_experience: int | None = None, validation_size: int | None = None,
                  eval_split: str = "test", base_classes: int | None = None) -> Scenario:
    """Split CIFAR-10 from the python pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    The files are looked up in ``root`` (or ``root/cifar-10-batches-py``, ``root/cifar10``),
    else in ``$EXML_FAST_DATA/cifar10``, ``<repo>/../shared/data/cifar10``, ``./../shared/data/cifar10``
    and ``~/.cache/exml_fast/data/cifar10`` (each also with ``/cifar-10-batches-py``). The pickles
    are read by an unpickler that only builds numpy arrays (no code runs). Images are
    normalised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`. Other arguments: see :func:`split_mnist`.
    The files are read by :func:`exml_fast.data.cifar_tensors`.

    Raises:
        FileNotFoundError: the files are nowhere; the message says where to put which files.
        ValueError: a malformed batch file.
    """
    return _split_cifar("cifar10", "split_cifar10_mt" if multi_task else "split_cifar10", n_experiences=n_experiences,
                        seed=seed, root=root, multi_task=multi_task, max_train_per_experience=max_train_per_experience,
                        max_test_per_experience=max_test_per_experience, validation_size=validation_size,
                        eval_split=eval_split, base_classes=base_classes)


def split_cifar100(n_experiences: int = 10, *, seed: int = 0, root: str | os.PathLike | None = None,
                   multi_task: bool = False, max_train_per_experience: int | None = None,
                   max_test_per_experience: int | None = None, validation_size: int | None = None,
                   eval_split: str = "test", base_classes: int | None = None) -> Scenario:
    """Split CIFAR-100 (the 100 fine labels) from the python pickles (``train``, ``test``), by default in 10
    experiences of 10 classes; ``base_classes=50, n_experiences=6`` is PyCIL's "B50 Inc10".

    The files are looked up as for :func:`split_cifar10`, in ``cifar100`` / ``cifar-100-python`` folders
    (``root``, ``root/cifar-100-python``, ``root/cifar100``, else ``$EXML_FAST_DATA/cifar100`` and the other
    data roots); the same code-free unpickler reads them. Images are normalised with
    :data:`CIFAR100_MEAN` / :data:`CIFAR100_STD`. Other arguments: see :func:`split_mnist`.

    Raises:
        FileNotFoundError: the files are nowhere; the message says where to put which files.
        ValueError: a malformed file.
    """
    return _split_cifar("cifar100", "split_cifar100_mt" if multi_task else "split_cifar100",
                        n_experiences=n_experiences, seed=seed, root=root, multi_task=multi_task,
                        max_train_per_experience=max_train_per_experience,
                        max_test_per_experience=max_test_per_experience, validation_size=validation_size,
                        eval_split=eval_split, base_classes=base_classes)


# ------------------------------------------------------------------------------------------------ registry


def _joint_mnist_factory(n_experiences: int = 1, **kwargs) -> Scenario:
    if n_experiences != 1:
        raise ValueError(f"joint_mnist: n_experiences must be 1 (one experience with all classes); got "
                         f"{n_experiences!r}")
    return joint_mnist(**kwargs)


def _mt(factory: Callable[..., Scenario]) -> Callable[..., Scenario]:
    def make(n_experiences: int | None = None, **kwargs) -> Scenario:
        if n_experiences is not None:
            kwargs["n_experiences"] = n_experiences  # else the factory's own default
        return factory(multi_task=True, **kwargs)

    make.__name__ = f"{factory.__name__}_mt"
    make.__doc__ = f"{factory.__name__}(..., multi_task=True)"
    return make


#: Scenario factories by name, each called as ``factory(n_experiences=..., seed=..., root=...)``
#: (plus the optional ``max_train_per_experience`` / ``max_test_per_experience``, ``validation_size`` /
#: ``eval_split`` and, for the split scenarios, ``base_classes``).
SCENARIOS: dict[str, Callable[..., Scenario]] = {
    "split_mnist": split_mnist,
    "split_mnist_mt": _mt(split_mnist),
    "joint_mnist": _joint_mnist_factory,
    "split_fashion_mnist": split_fashion_mnist,
    "split_fashion_mnist_mt": _mt(split_fashion_mnist),
    "split_cifar10": split_cifar10,
    "split_cifar10_mt": _mt(split_cifar10),
    "split_cifar100": split_cifar100,
    "split_cifar100_mt": _mt(split_cifar100),
}


def make_scenario(name: str, **kwargs) -> Scenario:
    """``SCENARIOS[name](**kwargs)``; e.g. ``make_scenario("split_mnist", n_experiences=5, seed=1)``."""
    check_choice(name, "name", "make_scenario", SCENARIOS)
    return SCENARIOS[name](**kwargs)


# ------------------------------------------------------------------------------------------- train_experts
# The training itself is exml_fast.training.experts'; here, the stream's bookkeeping (resume, metadata).


def train_experts(scenario: Scenario, out: str | os.PathLike, *, arch: str = "lenet5",
                  arch_kwargs: dict[str, Any] | None = None, epochs: int | None = None, lr: float = 0.01,
                  momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 32, seed: int = 0,
                  device: str | torch.device = "cpu", weights_format: str = "safetensors",
                  progress: bool = True) -> ExpertStream:
    """Trains one expert per experience of ``scenario`` and writes them as an :class:`ExpertStream` at ``out``.

    All experts start from one shared initialisation (``build_model`` once under
    ``seed``; each expert starts from a copy of its state_dict) and have the full
    ``scenario.num_classes`` outputs. Class-incremental experts are trained with
    cross-entropy over all outputs, multi-task experts over their head's units only
    (SGD, the paper's Appendix A recipe by default). Minibatch order of expert i comes
    from a CPU generator seeded from (``seed``, i): the same seed gives bit-identical
    experts on the CPU.

    Resumable: experts already in the stream at ``out`` are skipped (expert i depends
    only on the shared initialisation and its own seed, so a resumed stream equals an
    uninterrupted one); a stream at ``out`` made with another configuration raises
    ValueError naming the differing keys.

    Args:
        scenario: the experiences to train on.
        out: the stream's folder.
        arch, arch_kwargs: the model, ``build_model(arch, **arch_kwargs)``; ``num_classes`` and
            ``in_channels`` default to the scenario's (giving others is an error).
        epochs: passes over each experience; None: :func:`default_expert_epochs` (the paper's
            Appendix A: 100 for CIFAR-10 and for a one-experience (joint) scenario, 20 otherwise).
        lr, momentum, weight_decay, batch_size: SGD settings.
        seed: initialisation and minibatch order (int >= 0).
        device: where to train; the saved weights are on the CPU.
        weights_format: "safetensors" or "torch" (see :meth:`Expert.save`).
        progress: a tqdm bar per expert.

    Returns:
        The stream (all ``len(scenario)`` experts). Each expert's ``meta`` holds input_shape,
        mean, std, dataset, scenario, experience, multi_task, the training configuration,
        train/test sizes, ``test_accuracy`` (argmax over all outputs on its own experience's
        test set) and ``test_accuracy_head`` (argmax over its own classes only).
    """
    owner = "train_experts"
    if not isinstance(scenario, Scenario):
        raise TypeError(f"{owner}: scenario must be a Scenario; got {type(scenario).__name__}")
    check_choice(arch, "arch", owner, ARCHS)
    kwargs = dict(arch_kwargs or {})
    for key, value in (("num_classes", scenario.num_classes), ("in_channels", scenario.input_shape[0])):
        if kwargs.setdefault(key, value) != value:
            raise ValueError(f"{owner}: arch_kwargs[{key!r}] = {kwargs[key]!r} does not match the scenario's "
                             f"{value} (every expert has the scenario's full outputs and input channels)")
    if epochs is None:
        epochs = default_expert_epochs(scenario)
    check_int(epochs, "epochs", owner, low=1)
    check_int(batch_size, "batch_size", owner, low=1)
    check_int(seed, "seed", owner, low=0)
    check_sgd_settings(lr=lr, momentum=momentum, weight_decay=weight_decay, owner=owner)
    device = torch.device(device)

    training = {"epochs": epochs, "lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
                "batch_size": batch_size, "seed": seed, "optimizer": "sgd",
                "loss": "cross_entropy_head" if scenario.multi_task else "cross_entropy_all"}
    meta = {"scenario": scenario.describe(), "arch": arch, "arch_kwargs": kwargs, "training": training}
    stream = ExpertStream.create(out, meta=meta, exist_ok=True)
    if len(stream) == len(scenario):
        return stream

    model = init_expert_model(arch, kwargs, seed)
    init_state = copy.deepcopy(model.state_dict())
    model = model.to(device)
    for i in range(len(stream), len(scenario)):
        exp = scenario[i]
        model.load_state_dict(init_state)
        train_expert(model, exp.train_x, exp.train_y, units=exp.classes if scenario.multi_task else None,
                     num_classes=scenario.num_classes, epochs=epochs, batch_size=batch_size, lr=lr,
                     momentum=momentum, weight_decay=weight_decay,
                     generator=torch.Generator().manual_seed(batch_seed(seed, i)), progress=progress,
                     desc=f"expert {i + 1}/{len(scenario)} {list(exp.classes)}")
        expert_meta = {
            "input_shape": list(scenario.input_shape), "mean": list(scenario.mean), "std": list(scenario.std),
            "dataset": scenario.dataset, "scenario": scenario.name, "experience": i,
            "multi_task": scenario.multi_task, "training": training, "device": str(device),
            "train_size": exp.num_train, "test_size": exp.num_test,
            **_test_accuracies(model, exp, scenario.num_classes),
        }
        trained = copy.deepcopy(model).to("cpu")
        stream.append(Expert(trained, exp.classes, arch=arch, arch_kwargs=kwargs, task_id=exp.task_id,
                             meta=expert_meta), weights_format=weights_format)
        del trained
    return stream


def _test_accuracies(model, exp: Experience, num_classes: int) -> dict[str, float]:
    """An expert's accuracy on its own experience's test set: argmax over all outputs, and over its classes."""
    return {"test_accuracy": expert_accuracy(model, exp.test_x, exp.test_y, units=None, num_classes=num_classes),
            "test_accuracy_head": expert_accuracy(model, exp.test_x, exp.test_y, units=exp.classes,
                                                  num_classes=num_classes)}


def scenario_of(stream, *, root=None):
    """Rebuilds the scenario an expert stream was trained on, from the stream's metadata.

    Checks that the rebuilt scenario has the experiences (classes, task labels,
    sizes) the stream records, so a changed dataset or code cannot pass unseen.
    """
    desc = stream.meta.get("scenario")
    if not isinstance(desc, dict) or "name" not in desc or not isinstance(desc.get("kwargs"), dict):
        raise ValueError(f"the expert stream {stream.path} does not say which scenario it was trained on "
                         "(stream.json: meta.scenario.name / kwargs)")
    scenario = make_scenario(desc["name"], root=root, **desc["kwargs"])
    if scenario.describe()["experiences"] != desc.get("experiences"):
        raise ValueError(f"the scenario rebuilt for {stream.path} ({desc['name']}, {desc['kwargs']}) does not match "
                         "the experiences recorded with its experts (classes, task labels or sizes differ)")
    return scenario
