"""exml_fast.data: finding, verifying and parsing the MNIST / Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import os
import shutil
import struct

import pytest
import torch

from exml_fast.data import datasets as data

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Class counts of the MNIST test split, from the dataset's README.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir():
    folder = data.find_data_root("mnist")
    if folder is None:
        pytest.skip("MNIST files not found (set EXML_FAST_DATA)")
    return folder


@pytest.fixture
def no_data_anywhere(tmp_path, monkeypatch):
    """Point every place find_data_root searches at empty folders."""
    empty = tmp_path / "empty"
    (empty / "repo").mkdir(parents=True)
    (empty / "cwd").mkdir()
    (empty / "home").mkdir()
    monkeypatch.setenv("EXML_FAST_DATA", str(empty / "env"))
    monkeypatch.setattr(data, "_REPO_ROOT", empty / "repo")
    monkeypatch.setenv("HOME", str(empty / "home"))
    monkeypatch.chdir(empty / "cwd")
    return empty


def _write_gz(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


# -- IDX parsing ---------------------------------------------------------------------


def test_idx_roundtrip(tmp_path):
    images = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    _write_gz(tmp_path / "i.gz", struct.pack(">IIII", 0x803, 3, 4, 5) + images.numpy().tobytes())
    _write_gz(tmp_path / "l.gz", struct.pack(">II", 0x801, 3) + bytes([7, 0, 9]))
    got = data.read_idx_images(tmp_path / "i.gz")
    assert got.dtype == torch.uint8 and got.shape == (3, 4, 5)
    assert torch.equal(got, images)
    labels = data.read_idx_labels(tmp_path / "l.gz")
    assert labels.dtype == torch.int64 and labels.tolist() == [7, 0, 9]


def test_bad_magic(tmp_path):
    # An image header read as labels and vice versa: both must be refused.
    _write_gz(tmp_path / "x.gz", struct.pack(">IIII", 0x803, 1, 2, 2) + bytes(4))
    _write_gz(tmp_path / "y.gz", struct.pack(">II", 0x801, 2) + bytes(2))
    with pytest.raises(ValueError, match=r"x\.gz.*magic.*0x00000801"):
        data.read_idx_labels(tmp_path / "x.gz")
    with pytest.raises(ValueError, match=r"y\.gz.*magic.*0x00000803"):
        data.read_idx_images(tmp_path / "y.gz")


def test_size_mismatch(tmp_path):
    _write_gz(tmp_path / "short.gz", struct.pack(">IIII", 0x803, 2, 28, 28) + bytes(784))
    with pytest.raises(ValueError, match=r"short\.gz.*size mismatch"):
        data.read_idx_images(tmp_path / "short.gz")
    _write_gz(tmp_path / "long.gz", struct.pack(">II", 0x801, 2) + bytes(3))
    with pytest.raises(ValueError, match=r"long\.gz.*size mismatch"):
        data.read_idx_labels(tmp_path / "long.gz")


def test_not_gzip(tmp_path):
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"plain\.gz"):
        data.read_idx_labels(tmp_path / "plain.gz")


# -- argument checks -------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "training", "", "TEST"])
def test_split_validation(split):
    with pytest.raises(ValueError, match=r"split.*'train'.*'test'"):
        data.load_mnist(split)


def test_dataset_validation():
    with pytest.raises(ValueError, match=r"dataset.*'mnist'.*'fashion-mnist'"):
        data.load_mnist("test", dataset="cifar10")
    with pytest.raises(ValueError, match="dataset"):
        data.find_data_root("kmnist")


def test_pad_to_validation():
    with pytest.raises(ValueError, match="pad_to"):
        data.mnist_tensors("test", pad_to=20)
    with pytest.raises(ValueError, match="pad_to"):
        data.mnist_tensors("test", pad_to=True)


# -- checksums -------------------------------------------------------------------------


def test_md5_rejects_corrupted_copy(mnist_dir, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    # Only the test split is read; the train files just need to exist.
    for name in FILES:
        if name.startswith("t10k"):
            shutil.copyfile(mnist_dir / name, folder / name)
        else:
            (folder / name).write_bytes(b"")
    images, labels = data.load_mnist("test", root=tmp_path)  # the intact copy loads
    assert images.shape == (10000, 28, 28)

    target = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(0, 12345))  # a new mtime even on coarse-clock filesystems
    expected = data.MD5SUMS["mnist"]["t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(ValueError, match=rf"t10k-labels-idx1-ubyte\.gz.*{expected}") as info:
        data.load_mnist("test", root=folder)
    assert data.md5sum(target) in str(info.value)


def test_md5_cache_sees_replaced_file(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert data.md5sum(f) == "900150983cd24fb0d6963f7d28e17f72"
    f.write_bytes(b"abcd")
    assert data.md5sum(f) == "e2fc714c4727ee9395f324cd2e7f331f"


# -- finding the files -----------------------------------------------------------------


def test_env_var_honoured(mnist_dir, tmp_path, monkeypatch):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in FILES:
        os.symlink(mnist_dir / name, folder / name)
    monkeypatch.setenv("EXML_FAST_DATA", str(tmp_path))
    assert data.find_data_root("mnist") == folder
    _, labels = data.load_mnist("test")
    assert labels.shape == (10000,)


def test_env_var_without_files_falls_through(tmp_path, monkeypatch, mnist_dir):
    monkeypatch.setenv("EXML_FAST_DATA", str(tmp_path))
    assert data.find_data_root("mnist") == mnist_dir


def test_not_found_without_download(no_data_anywhere):
    assert data.find_data_root("mnist") is None
    with pytest.raises(FileNotFoundError, match="EXML_FAST_DATA") as info:
        data.load_mnist("test", download=False)
    msg = str(info.value)
    assert str(no_data_anywhere / "env" / "mnist") in msg
    assert "download=False" in msg


def test_explicit_root_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.load_mnist("test", root=tmp_path, download=False)


# -- the real files --------------------------------------------------------------------


def test_real_mnist_test_split(mnist_dir):
    images, labels = data.load_mnist("test")
    assert images.dtype == torch.uint8 and images.shape == (10000, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (10000,)
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_mnist_tensors(mnist_dir):
    mean, std = data.DATASET_STATS["mnist"]
    assert (mean, std) == (data.MNIST_MEAN, data.MNIST_STD) == (0.1307, 0.3081)
    x, y = data.mnist_tensors("test", pad_to=32)
    assert x.dtype == torch.float32 and x.shape == (10000, 1, 32, 32)
    assert y.shape == (10000,)
    background = (0.0 - mean) / std
    assert torch.allclose(x[:, :, :2, :], torch.full_like(x[:, :, :2, :], background))
    assert torch.allclose(x[:, :, :, -2:], torch.full_like(x[:, :, :, -2:], background))
    raw, _ = data.load_mnist("test")
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], (raw.float() / 255 - mean) / std)

    x28, _ = data.mnist_tensors("test", pad_to=28, normalize=False)
    assert x28.shape == (10000, 1, 28, 28)
    assert float(x28.min()) == 0.0 and float(x28.max()) == 1.0

    # resize=True: the papers' bilinear 28 -> 32 (the digit fills the frame, pixels stay in [0, 1])
    xr, yr = data.mnist_tensors("test", pad_to=32, normalize=False, resize=True)
    assert xr.shape == (10000, 1, 32, 32) and torch.equal(yr, y)
    assert float(xr.min()) >= 0.0 and float(xr.max()) <= 1.0
    torch.testing.assert_close(xr, torch.nn.functional.interpolate(x28, size=(32, 32), mode="bilinear",
                                                                   align_corners=False).clamp(0, 1))
    xrn, _ = data.mnist_tensors("test", pad_to=32, resize=True)
    torch.testing.assert_close(xrn, (xr - mean) / std)
