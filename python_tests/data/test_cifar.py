"""exml_fast.data.cifar: CIFAR-10 / -100 python pickles read into normalised tensors, where it looks for them, and
the code-free unpickler. (Scenarios built on them: python_tests/cl/test_scenarios.py.)"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from _util import fake_cifar10

from exml_fast.data import CIFAR10_MEAN, CIFAR10_STD, CIFAR_LAYOUTS, cifar_tensors, find_cifar, read_cifar_batch




def test_cifar_tensors_reads_and_normalises(tmp_path):
    fake_cifar10(tmp_path / "cifar-10-batches-py")
    x, y = cifar_tensors("train", root=tmp_path)
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(6)] * 5  # batches in file order
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    assert torch.allclose(x[0, 1, 2, 3], (1 - mean[1]) / std[1])
    assert torch.allclose(x[0, 0, 2, 3], -mean[0] / std[0]) and torch.allclose(x[0, 1, 3, 2], -mean[1] / std[1])
    xt, yt = cifar_tensors("test", dataset="cifar10", root=tmp_path)
    assert xt.shape == (10, 3, 32, 32) and yt.tolist() == list(range(10))
    raw, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", CIFAR_LAYOUTS["cifar10"])
    assert raw.dtype == torch.uint8 and raw.shape == (10, 3, 32, 32) and int(raw[0, 1, 2, 3]) == 255
    assert labels.tolist() == list(range(10))


def test_bad_split_or_dataset_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="cifar_tensors: split must be one of train, test; got 'val'"):
        cifar_tensors("val", root=tmp_path)
    with pytest.raises(ValueError, match="cifar_tensors: dataset must be one of cifar10, cifar100; got 'svhn'"):
        cifar_tensors("train", dataset="svhn", root=tmp_path)
    with pytest.raises(ValueError, match="find_cifar: dataset must be one of"):
        find_cifar("mnist", tmp_path)


def test_found_through_the_environment(tmp_path, monkeypatch):
    fake_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    monkeypatch.setenv("EXML_FAST_DATA", str(tmp_path))
    assert find_cifar("cifar10") == tmp_path / "cifar10" / "cifar-10-batches-py"


def test_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.setenv("EXML_FAST_DATA", str(tmp_path / "env"))
    (tmp_path / "c").mkdir()
    fake_cifar10(tmp_path / "c")
    os.unlink(tmp_path / "c" / "data_batch_4")
    with pytest.raises(FileNotFoundError) as info:
        cifar_tensors("train", root=tmp_path / "c")
    msg = str(info.value)
    for needle in ["data_batch_1", "data_batch_5", "test_batch", "cifar-10-python.tar.gz", "EXML_FAST_DATA",
                   str(tmp_path / "c")]:
        assert needle in msg
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "env" / "cifar10")):
        cifar_tensors("test")


def test_pickle_with_code_is_refused(tmp_path):
    fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"test_batch: not a readable CIFAR-10 batch.*is not allowed"):
        cifar_tensors("test", root=tmp_path)
