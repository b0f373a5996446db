"""MNIST and Fashion-MNIST from their original gzip IDX files.

The files are never committed (see ``.gitignore``); they are looked up, in
order, in

1. ``$EXML_FAST_DATA/<dataset>`` when the environment variable is set,
2. ``<repository root>/../shared/data/<dataset>``,
3. ``<current directory>/../shared/data/<dataset>``,
4. ``~/.cache/exml_fast/data/<dataset>`` (also where a download goes).

``<dataset>`` is ``mnist`` or ``fashion-mnist``. A folder in torchvision's layout
(``<root>/MNIST/raw`` or ``<root>/FashionMNIST/raw``) is accepted too. Every
file's MD5 is checked against the checksum published with the dataset before it
is parsed.

Example::

    images, labels = load_mnist("test")          # uint8 (10000, 28, 28), int64 (10000,)
    x, y = mnist_tensors("train", pad_to=32)     # float32 (60000, 1, 32, 32), normalised
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import struct

import torch

__all__ = [
    "DATASETS",
    "auxiliary_inputs",
    "DATASET_STATS",
    "MD5SUMS",
    "MNIST_MEAN",
    "MNIST_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "find_data_root",
    "load_mnist",
    "mnist_tensors",
    "read_idx_images",
    "read_idx_labels",
    "md5sum",
]

DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")

#: Mean and standard deviation of the training pixels scaled to [0, 1].
DATASET_STATS: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
}
MNIST_MEAN, MNIST_STD = DATASET_STATS["mnist"]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = DATASET_STATS["fashion-mnist"]

# (images file, labels file) of each split; the names are the same in both datasets.
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FILES = _SPLIT_FILES["train"] + _SPLIT_FILES["test"]

#: Checksums published by the dataset maintainers (the ones torchvision uses).
MD5SUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# torchvision class name and folder for each dataset (raw files in <root>/<Name>/raw/).
_TORCHVISION_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

ENV_VAR = "EXML_FAST_DATA"
# The repository root: the parent of the package folder.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# (resolved path, size, mtime_ns) -> md5 hex digest. Keyed on size and mtime so
# that a file replaced in place is hashed again.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return dataset


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def cache_dir() -> pathlib.Path:
    """The per-user folder a download goes to: ``~/.cache/exml_fast/data``."""
    return pathlib.Path.home() / ".cache" / "exml_fast" / "data"


def search_roots() -> list[pathlib.Path]:
    """The roots searched by :func:`find_data_root`, in order."""
    roots = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(pathlib.Path(env).expanduser())
    roots.append(_REPO_ROOT / ".." / "shared" / "data")
    roots.append(pathlib.Path.cwd() / ".." / "shared" / "data")
    roots.append(cache_dir())
    return roots


def _candidate_dirs(root: pathlib.Path, dataset: str) -> list[pathlib.Path]:
    return [root / dataset, root / _TORCHVISION_NAMES[dataset] / "raw"]


def _has_all_files(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in _FILES)


def find_data_root(dataset: str) -> pathlib.Path | None:
    """The folder holding the four ``.gz`` files of ``dataset``, or ``None``.

    Args:
        dataset: ``"mnist"`` or ``"fashion-mnist"``.

    Returns:
        The first folder ``<root>/<dataset>`` (or torchvision's
        ``<root>/<Name>/raw``) that holds all four files, searching the roots
        listed in the module docstring in order; ``None`` when none does.
    """
    _check_dataset(dataset)
    for root in search_roots():
        for folder in _candidate_dirs(root, dataset):
            if _has_all_files(folder):
                return pathlib.Path(os.path.abspath(folder))
    return None


def md5sum(path: str | os.PathLike) -> str:
    """MD5 hex digest of a file, cached per (path, size, mtime) in this process."""
    path = pathlib.Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _MD5_CACHE.get(key)
    if digest is None:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        _MD5_CACHE[key] = digest
    return digest


def _verify(path: pathlib.Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise ValueError(
            f"{path}: corrupt or wrong file, md5 {actual} but expected {expected}; "
            "delete it and fetch the original file again"
        )


def _read_gz(path: pathlib.Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e


def _check_magic(path: pathlib.Path, data: bytes, expected: int, what: str, *, header: int) -> None:
    if len(data) >= 4:
        (magic,) = struct.unpack(">I", data[:4])
        if magic != expected:
            raise ValueError(
                f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected:08x} "
                f"(IDX unsigned-byte {what})"
            )
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX {what} header ({header} bytes)")


def read_idx_images(path: str | os.PathLike) -> torch.Tensor:
    """Parse a gzip IDX image file (magic 0x00000803).

    Returns:
        uint8 tensor of shape (N, rows, cols) — (N, 28, 28) for (Fashion-)MNIST.

    Raises:
        ValueError: bad magic number, or the payload size does not match the header.
    """
    path = pathlib.Path(path)
    data = _read_gz(path)
    _check_magic(path, data, _IDX_IMAGES_MAGIC, "images", header=16)
    _, n, rows, cols = struct.unpack(">IIII", data[:16])
    expected = 16 + n * rows * cols
    if len(data) != expected:
        raise ValueError(
            f"{path}: size mismatch, header says {n} images of {rows}x{cols} "
            f"({expected} bytes) but the file holds {len(data)} bytes"
        )
    # bytearray: torch.frombuffer needs a writable buffer to hand out a writable tensor.
    buf = bytearray(data[16:])
    if n == 0:
        return torch.empty(0, rows, cols, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8).view(n, rows, cols)


def read_idx_labels(path: str | os.PathLike) -> torch.Tensor:
    """Parse a gzip IDX label file (magic 0x00000801).

    Returns:
        int64 tensor of shape (N,).

    Raises:
        ValueError: bad magic number, or the payload size does not match the header.
    """
    path = pathlib.Path(path)
    data = _read_gz(path)
    _check_magic(path, data, _IDX_LABELS_MAGIC, "labels", header=8)
    _, n = struct.unpack(">II", data[:8])
    if len(data) != 8 + n:
        raise ValueError(
            f"{path}: size mismatch, header says {n} labels ({8 + n} bytes) "
            f"but the file holds {len(data)} bytes"
        )
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).to(torch.int64)


def _download(dataset: str) -> pathlib.Path | None:
    """Fetch the raw files with torchvision into the cache; None on any failure."""
    try:
        import torchvision.datasets as tvd
    except ImportError:
        return None
    cls = getattr(tvd, _TORCHVISION_NAMES[dataset])
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception:  # noqa: BLE001 - no network, HTTP errors, bad mirror: all mean "not available"
        return None
    folder = root / _TORCHVISION_NAMES[dataset] / "raw"
    return folder if _has_all_files(folder) else None


def _not_found(dataset: str, looked: list[pathlib.Path], tried_download: bool) -> FileNotFoundError:
    where = "\n".join(f"  {p}" for p in looked)
    how = "the download through torchvision failed (no network?)" if tried_download else "download=False"
    return FileNotFoundError(
        f"{dataset}: no folder holding {', '.join(_FILES)} was found; looked in\n{where}\n"
        f"and {how}. Put the four original .gz files in <DIR>/{dataset}/ and set "
        f"{ENV_VAR}=<DIR>, or pass root=<DIR>."
    )


def _resolve_folder(dataset: str, root: str | os.PathLike | None, download: bool) -> pathlib.Path:
    if root is not None:
        root = pathlib.Path(root).expanduser()
        # Accept the dataset folder itself as well as its parent.
        looked = [root, *_candidate_dirs(root, dataset)]
        for folder in looked:
            if _has_all_files(folder):
                return folder
        raise _not_found(dataset, looked, tried_download=False)
    folder = find_data_root(dataset)
    if folder is not None:
        return folder
    looked = [d for r in search_roots() for d in _candidate_dirs(r, dataset)]
    if download:
        folder = _download(dataset)
        if folder is not None:
            return folder
    raise _not_found(dataset, looked, tried_download=download)


def load_mnist(
    split: str = "train",
    *,
    dataset: str = "mnist",
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of MNIST or Fashion-MNIST as raw tensors.

    Args:
        split: ``"train"`` (60000 items) or ``"test"`` (10000 items).
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        root: a folder holding the four files, or holding ``<dataset>/`` with
            them; ``None`` searches the places listed in the module docstring.
            An explicit ``root`` is never downloaded into.
        download: when nothing is found, try torchvision's downloader into
            ``~/.cache/exml_fast/data``.

    Returns:
        ``(images, labels)``: uint8 (N, 28, 28) with pixels 0-255, int64 (N,)
        with classes 0-9.

    Raises:
        ValueError: bad ``split``/``dataset``, a file whose MD5 is not the
            published one, or a malformed IDX file.
        FileNotFoundError: no folder with the files, and no download.
    """
    _check_split(split)
    _check_dataset(dataset)
    folder = _resolve_folder(dataset, root, download)
    images_name, labels_name = _SPLIT_FILES[split]
    images_path, labels_path = folder / images_name, folder / labels_name
    _verify(images_path, MD5SUMS[dataset][images_name])
    _verify(labels_path, MD5SUMS[dataset][labels_name])
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: {images.shape[0]} images in {images_name} but {labels.shape[0]} labels in {labels_name}"
        )
    return images, labels


def mnist_tensors(
    split: str,
    *,
    dataset: str = "mnist",
    pad_to: int = 32,
    normalize: bool = True,
    root: str | os.PathLike | None = None,
    resize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ready for a network: float32, channel dimension, padded (or resized), normalised.

    Args:
        split: ``"train"`` or ``"test"``.
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        pad_to: side of the output; the 28x28 digit is zero-padded centrally
            (the extra pixel of an odd margin goes right/bottom). 28 = no pad.
        normalize: subtract the dataset mean and divide by its std
            (:data:`DATASET_STATS`) after scaling to [0, 1]; padding is 0
            before normalisation, i.e. ``-mean/std`` after.
        root: see :func:`load_mnist`.
        resize: scale the 28x28 image bilinearly to ``pad_to`` x ``pad_to``
            instead of padding it (the Data Impressions, DAFL and DFAD papers
            resize MNIST to 32x32).

    Returns:
        ``(images, labels)``: float32 (N, 1, pad_to, pad_to), int64 (N,).
    """
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 28:
        raise ValueError(f"mnist_tensors: pad_to must be an int >= 28, got {pad_to!r}")
    images, labels = load_mnist(split, dataset=dataset, root=root)
    x = images.to(torch.float32).div_(255.0).unsqueeze(1)
    if resize and pad_to > 28:
        x = torch.nn.functional.interpolate(x, size=(pad_to, pad_to), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)
    elif pad_to > 28:
        lo = (pad_to - 28) // 2
        hi = pad_to - 28 - lo
        x = torch.nn.functional.pad(x, (lo, hi, lo, hi))
    if normalize:
        mean, std = DATASET_STATS[dataset]
        x = x.sub_(mean).div_(std)
    return x.contiguous(), labels


def auxiliary_inputs(
    dataset: str,
    *,
    input_shape: tuple[int, int, int] | list[int],
    mean=None,
    std=None,
    split: str = "train",
    root: str | os.PathLike | None = None,
) -> torch.Tensor:
    """An unrelated dataset's images in another model's input space (auxiliary data).

    Loads ``split`` of ``dataset`` (MNIST or Fashion-MNIST), pads the 28x28
    images to ``input_shape``'s square side, repeats the grey channel to its
    channel count and normalises with the *target* model's ``mean``/``std``
    (per channel; None: left in [0, 1]).

    Returns:
        float32 (N, C, H, W), contiguous.
    """
    c, h, w = (int(v) for v in input_shape)
    if h != w or h < 28:
        raise ValueError(f"auxiliary_inputs: input_shape {tuple(input_shape)} cannot take {dataset} images "
                         "(28x28, padded to a square side >= 28)")
    x, _ = mnist_tensors(split, dataset=dataset, pad_to=h, normalize=False, root=root)
    if c != 1:
        x = x.expand(-1, c, -1, -1)
    if (mean is None) != (std is None):
        raise ValueError("auxiliary_inputs: give both mean and std, or neither")
    if mean is not None:
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if m.numel() not in (1, c) or s.numel() not in (1, c):
            raise ValueError(f"auxiliary_inputs: mean and std need 1 or {c} values; got {m.numel()} and {s.numel()}")
        x = (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)
    return x.contiguous()
