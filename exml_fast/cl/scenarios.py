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
CIFAR-100 (its 100 fine labels) from the python pickles, normalised per channel.
Joint MNIST is one experience holding all ten classes and the full 60000-image training set (the paper reports 50000
training samples, i.e. it held out a validation split; pass
``max_train_per_experience=50000`` for that size).

Example::

    scenario = make_scenario("split_mnist", n_experiences=5, seed=0)
    stream = train_experts(scenario, "runs/split_mnist_s0", arch="lenet5")   # resumable
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_choice, check_int
from exml_fast.cl.experts import Expert, ExpertStream
from exml_fast.cl.heads import task_head_mask

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD", "EVAL_SPLITS", "Experience", "SCENARIOS",
           "Scenario", "class_order", "default_expert_epochs", "joint_mnist", "make_scenario", "scenario_of",
           "split_cifar10", "split_cifar100", "split_fashion_mnist", "split_mnist", "train_experts",
           "validation_indices"]

#: Per-channel mean and std of the CIFAR-10 training pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: Per-channel mean and std of the CIFAR-100 training pixels scaled to [0, 1].
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR100_FOLDER = "cifar-100-python"


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
    from exml_fast.data import DATASET_STATS, mnist_tensors

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


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches: plain containers and numpy arrays, nothing else (no code)."""

    # _codecs.encode: how protocol-2 pickles written by Python 3 store bytes (a str -> bytes conversion).
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


@dataclass(frozen=True)
class _CifarLayout:
    """Where a CIFAR version's python pickles live and what they hold."""

    dataset: str  # "cifar10" | "cifar100": the folder under a data root
    folder: str  # the folder the archive extracts to
    train: tuple[str, ...]
    test: str
    label_key: str
    num_classes: int
    archive: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR10 = _CifarLayout("cifar10", _CIFAR_FOLDER, _CIFAR_TRAIN, _CIFAR_TEST, "labels", 10, "cifar-10-python.tar.gz",
                        CIFAR10_MEAN, CIFAR10_STD)
_CIFAR100 = _CifarLayout("cifar100", _CIFAR100_FOLDER, ("train",), "test", "fine_labels", 100,
                         "cifar-100-python.tar.gz", CIFAR100_MEAN, CIFAR100_STD)


def _cifar_candidates(root, layout: _CifarLayout) -> list[pathlib.Path]:
    from exml_fast.data.datasets import search_roots

    if root is not None:
        r = pathlib.Path(root).expanduser()
        return [r, r / layout.folder, r / layout.dataset, r / layout.dataset / layout.folder]
    return [d for r in search_roots() for d in (r / layout.dataset, r / layout.dataset / layout.folder)]


def _find_cifar(root, layout: _CifarLayout) -> pathlib.Path:
    looked = _cifar_candidates(root, layout)
    names = (*layout.train, layout.test)
    for folder in looked:
        if all((folder / n).is_file() for n in names):
            return folder
    where = "\n".join(f"  {p}" for p in looked)
    name = "CIFAR-10" if layout.num_classes == 10 else "CIFAR-100"
    raise FileNotFoundError(
        f"{layout.dataset}: no folder holding {', '.join(names)} (the {name} python version: {layout.archive} "
        f"from https://www.cs.toronto.edu/~kriz/cifar.html, extracted) was found; looked in\n{where}\n"
        f"Put the {len(names)} files in <DIR>/{layout.dataset}/ (or <DIR>/{layout.dataset}/{layout.folder}/) and "
        f"set EXML_FAST_DATA=<DIR>, or pass root=<the folder holding them>."
    )


def _read_cifar_batch(path: pathlib.Path, layout: _CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one pickled batch."""
    import numpy as np

    name = "CIFAR-10" if layout.num_classes == 10 else "CIFAR-100"
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a readable {name} batch (corrupt file?): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a {name} batch (a {type(obj).__name__}, not a dict)")
    get = lambda key: obj.get(key.encode(), obj.get(key))  # noqa: E731 - python 2 pickles have bytes keys
    data, labels = get("data"), get(layout.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072); got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    labels_t = torch.as_tensor(list(labels) if labels is not None else [], dtype=torch.int64)
    k = layout.num_classes
    if labels_t.shape[0] != data.shape[0] or (labels_t.numel() and not (0 <= labels_t.min() and labels_t.max() < k)):
        raise ValueError(f"{path}: '{layout.label_key}' must hold {data.shape[0]} classes in 0..{k - 1}")
    # Each row: 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32.
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), labels_t


def _cifar_tensors(paths: list[pathlib.Path], layout: _CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_cifar_batch(p, layout) for p in paths]
    x = torch.cat([p[0] for p in parts]).to(torch.float32).div_(255.0)
    mean = torch.tensor(layout.mean).view(1, 3, 1, 1)
    std = torch.tensor(layout.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(), torch.cat([p[1] for p in parts])


def _split_cifar(layout: _CifarLayout, name: str, *, n_experiences: int, seed: int, root, multi_task: bool,
                 max_train_per_experience, max_test_per_experience, validation_size, eval_split: str,
                 base_classes) -> Scenario:
    check_int(n_experiences, "n_experiences", name, low=1, high=layout.num_classes)
    folder = _find_cifar(root, layout)
    train = _cifar_tensors([folder / n for n in layout.train], layout)
    test = _cifar_tensors([folder / layout.test], layout)
    return _build(name, layout.dataset, train=train, test=test, num_classes=layout.num_classes, mean=layout.mean,
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

    Raises:
        FileNotFoundError: the files are nowhere; the message says where to put which files.
        ValueError: a malformed batch file.
    """
    return _split_cifar(_CIFAR10, "split_cifar10_mt" if multi_task else "split_cifar10", n_experiences=n_experiences,
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
    return _split_cifar(_CIFAR100, "split_cifar100_mt" if multi_task else "split_cifar100",
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


class _Head(nn.Module):
    """The logits of a subset of output units, (B, K) -> (B, len(units)): a multi-task head for training."""

    def __init__(self, model: nn.Module, units: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("units", torch.tensor(units, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.units)


def _to_head_labels(y: torch.Tensor, units: tuple[int, ...], num_classes: int) -> torch.Tensor:
    lut = torch.full((num_classes,), -1, dtype=torch.int64)
    lut[list(units)] = torch.arange(len(units))
    return lut[y]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, units: tuple[int, ...] | None,
              num_classes: int) -> float:
    """Top-1 accuracy in [0, 1], argmax over all outputs (units None) or over ``units`` only; nan for no samples."""
    from exml_fast.training import evaluate

    if x.shape[0] == 0:
        return float("nan")
    if units is None:
        return evaluate(model, x, y)
    head = _Head(model, units).to(next(model.parameters()).device)
    return evaluate(head, x, _to_head_labels(y, units, num_classes))


def default_expert_epochs(scenario: Scenario) -> int:
    """Epochs of the ExML paper's experts (Appendix A): CIFAR-10 100 (joint, split and multi-task), MNIST 100
    for the joint scenario and 20 for the split ones. CIFAR-100, which the paper does not use, takes
    CIFAR-10's 100."""
    return 100 if scenario.dataset in ("cifar10", "cifar100") or len(scenario) == 1 else 20


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
    from exml_fast._utils.progress import Progress
    from exml_fast.models import ARCHS, build_model
    from exml_fast.synth.base import batch_seed
    from exml_fast.training import minibatch_bounds, train_classifier

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
    for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, 0.0), ("weight_decay", weight_decay, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low \
                or (name == "lr" and value == 0):
            raise ValueError(f"{owner}: {name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}; "
                             f"got {value!r}")
    device = torch.device(device)

    training = {"epochs": epochs, "lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
                "batch_size": batch_size, "seed": seed, "optimizer": "sgd",
                "loss": "cross_entropy_head" if scenario.multi_task else "cross_entropy_all"}
    meta = {"scenario": scenario.describe(), "arch": arch, "arch_kwargs": kwargs, "training": training}
    stream = ExpertStream.create(out, meta=meta, exist_ok=True)
    if len(stream) == len(scenario):
        return stream

    with torch.random.fork_rng(devices=[]):  # the initialisation draws from the global generator
        torch.manual_seed(seed)
        model = build_model(arch, **kwargs)
    init_state = copy.deepcopy(model.state_dict())
    model = model.to(device)

    for i in range(len(stream), len(scenario)):
        exp = scenario[i]
        model.load_state_dict(init_state)
        units = exp.classes if scenario.multi_task else None
        net = model if units is None else _Head(model, units).to(device)
        y = exp.train_y if units is None else _to_head_labels(exp.train_y, units, scenario.num_classes)
        steps = epochs * len(minibatch_bounds(exp.num_train, batch_size))
        bar = Progress(steps, f"expert {i + 1}/{len(scenario)} {list(exp.classes)}", progress)
        losses: list[torch.Tensor] = []

        def on_step(epoch: int, step: int, loss: torch.Tensor, _bar=bar, _losses=losses) -> None:
            _losses.append(loss)
            if len(_losses) == 50:  # one device sync per 50 steps for the postfix
                _bar.update(50, {"loss": torch.stack(_losses).mean().item(), "epoch": epoch + 1})
                _losses.clear()

        try:
            train_classifier(net, exp.train_x, y, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, generator=torch.Generator().manual_seed(batch_seed(seed, i)),
                             callback=on_step if progress else None)
            if losses:
                bar.update(len(losses), {"loss": torch.stack(losses).mean().item()})
        finally:
            bar.close()
        model.eval()
        acc_all = _accuracy(model, exp.test_x, exp.test_y, units=None, num_classes=scenario.num_classes)
        acc_head = _accuracy(model, exp.test_x, exp.test_y, units=exp.classes, num_classes=scenario.num_classes)
        expert_meta = {
            "input_shape": list(scenario.input_shape), "mean": list(scenario.mean), "std": list(scenario.std),
            "dataset": scenario.dataset, "scenario": scenario.name, "experience": i,
            "multi_task": scenario.multi_task, "training": training, "device": str(device),
            "train_size": exp.num_train, "test_size": exp.num_test,
            "test_accuracy": acc_all, "test_accuracy_head": acc_head,
        }
        trained = copy.deepcopy(model).to("cpu")
        stream.append(Expert(trained, exp.classes, arch=arch, arch_kwargs=kwargs, task_id=exp.task_id,
                             meta=expert_meta), weights_format=weights_format)
        del trained
    return stream


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
