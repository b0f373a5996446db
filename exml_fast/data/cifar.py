"""CIFAR-10 and CIFAR-100 (its 100 fine labels) from the python pickles of
https://www.cs.toronto.edu/~kriz/cifar.html, read by an unpickler that only builds numpy arrays (no code runs).

The files are looked up in ``root`` (or ``root/<folder>``, ``root/<dataset>``, ``root/<dataset>/<folder>``),
else in ``<data root>/<dataset>`` and ``<data root>/<dataset>/<folder>`` for every data root of
:func:`~exml_fast.data.search_roots` (``$EXML_FAST_DATA``, ``<repo>/../shared/data``, ...), where ``<dataset>``
is "cifar10" / "cifar100" and ``<folder>`` the archive's "cifar-10-batches-py" / "cifar-100-python".

Example::

    x, y = cifar_tensors("train", dataset="cifar10")   # (50000, 3, 32, 32) float32 normalised, (50000,) int64
"""

from __future__ import annotations

import os
import pathlib
import pickle
from dataclasses import dataclass

import torch

from exml_fast._utils.checks import check_choice
from exml_fast.data.datasets import search_roots

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR_LAYOUTS", "CifarLayout",
           "cifar_tensors", "find_cifar", "read_cifar_batch"]

#: Per-channel mean and std of the CIFAR-10 training pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: Per-channel mean and std of the CIFAR-100 training pixels scaled to [0, 1].
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


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
class CifarLayout:
    """Where a CIFAR version's python pickles live and what they hold.

    Attributes:
        dataset: "cifar10" | "cifar100": the folder under a data root.
        folder: the folder the archive extracts to.
        train: the training batch files; test: the test batch file.
        label_key: the key of the labels in a batch ("labels", or CIFAR-100's "fine_labels").
        num_classes: 10 or 100.
        archive: the archive's file name on the CIFAR page.
        mean, std: per-channel normalisation of pixels in [0, 1].
    """

    dataset: str
    folder: str
    train: tuple[str, ...]
    test: str
    label_key: str
    num_classes: int
    archive: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def title(self) -> str:
        return "CIFAR-10" if self.num_classes == 10 else "CIFAR-100"


#: The two CIFAR versions by dataset name.
CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           "test_batch", "labels", 10, "cifar-10-python.tar.gz", CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": CifarLayout("cifar100", "cifar-100-python", ("train",), "test", "fine_labels", 100,
                            "cifar-100-python.tar.gz", CIFAR100_MEAN, CIFAR100_STD),
}


def _candidates(root, layout: CifarLayout) -> list[pathlib.Path]:
    if root is not None:
        r = pathlib.Path(root).expanduser()
        return [r, r / layout.folder, r / layout.dataset, r / layout.dataset / layout.folder]
    return [d for r in search_roots() for d in (r / layout.dataset, r / layout.dataset / layout.folder)]


def find_cifar(dataset: str, root: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder holding all of ``dataset``'s batch files (see the module docstring for where it looks).

    Raises:
        FileNotFoundError: the files are nowhere; the message says where it looked and where to put which files.
    """
    check_choice(dataset, "dataset", "find_cifar", CIFAR_LAYOUTS)
    layout = CIFAR_LAYOUTS[dataset]
    looked = _candidates(root, layout)
    names = (*layout.train, layout.test)
    for folder in looked:
        if all((folder / n).is_file() for n in names):
            return folder
    where = "\n".join(f"  {p}" for p in looked)
    raise FileNotFoundError(
        f"{layout.dataset}: no folder holding {', '.join(names)} (the {layout.title} python version: "
        f"{layout.archive} from https://www.cs.toronto.edu/~kriz/cifar.html, extracted) was found; looked in\n"
        f"{where}\nPut the {len(names)} files in <DIR>/{layout.dataset}/ (or <DIR>/{layout.dataset}/{layout.folder}/) "
        f"and set EXML_FAST_DATA=<DIR>, or pass root=<the folder holding them>."
    )


def read_cifar_batch(path: str | os.PathLike, layout: CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one pickled batch.

    Raises:
        ValueError: not a readable batch (corrupt, holds code, or wrong arrays); the message names the file.
    """
    import numpy as np

    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a readable {layout.title} batch (corrupt file?): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a {layout.title} batch (a {type(obj).__name__}, not a dict)")
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


def cifar_tensors(split: str, *, dataset: str = "cifar10",
                  root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR split as tensors: images (N, 3, 32, 32) float32 normalised per channel with the layout's mean and
    std (:data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, or CIFAR-100's), labels (N,) int64. ``split``: "train"
    (the training batches in file order) or "test".

    Raises:
        FileNotFoundError: the files are nowhere (:func:`find_cifar`).
        ValueError: a malformed batch file, or a bad ``split`` / ``dataset``.
    """
    check_choice(split, "split", "cifar_tensors", ("train", "test"))
    check_choice(dataset, "dataset", "cifar_tensors", CIFAR_LAYOUTS)
    layout = CIFAR_LAYOUTS[dataset]
    folder = find_cifar(dataset, root)
    names = layout.train if split == "train" else (layout.test,)
    parts = [read_cifar_batch(folder / n, layout) for n in names]
    x = torch.cat([p[0] for p in parts]).to(torch.float32).div_(255.0)
    mean = torch.tensor(layout.mean).view(1, 3, 1, 1)
    std = torch.tensor(layout.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(), torch.cat([p[1] for p in parts])
