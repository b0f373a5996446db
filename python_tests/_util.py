"""Shared pieces of the op tests: devices, dtypes, the compiled-ops skip and
tolerances relative to PyTorch's own error in a dtype."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import exml_fast

requires_ops = pytest.mark.skipif(not exml_fast.has_ops(), reason="compiled exml_fast._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FLOAT_DTYPES = DTYPES

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ],
)
DEVICES = ["cpu", CUDA]


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_cpp_autograd(out: torch.Tensor, function: str) -> None:
    """out's autograd node is `function`, a torch::autograd::Function of exml_fast (csrc/ops/<op>.cpp), not a
    Python autograd.Function such as the one torch.library.register_autograd generates."""
    node = out.grad_fn
    assert node is not None, "out has no autograd node"
    assert not isinstance(node, torch.autograd.function.BackwardCFunction), f"Python autograd node {node.name()}"
    assert node.name().startswith("torch::autograd::CppNode<exml_fast::") and function in node.name(), node.name()


def calibrated_bn(model: torch.nn.Module, shape, seed: int = 0, batches: int = 4) -> torch.nn.Module:
    """``model`` with running BN statistics from ``batches`` train-mode forwards of 16 random N(0.1, 0.8²)
    inputs of ``shape`` (so BN matching has a target), returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((16, *shape), generator=g) * 0.8 + 0.1)
    return model.eval()


def toy_expert_stream(path, scenario, *, num_classes: int, seed: int = 3):
    """One LeNet-5 per experience of ``scenario`` (band images, 1 x 32 x 32), trained 2 epochs from one shared
    initialisation drawn from ``seed``, written as an expert stream at ``path``; returns it reopened."""
    from exml_fast.cl.experts import Expert, ExpertStream
    from exml_fast.models import build_model
    from exml_fast.training import train_classifier

    stream = ExpertStream.create(path, meta={"scenario": {"name": "toy"}})
    torch.manual_seed(seed)
    init = build_model("lenet5", num_classes=num_classes).state_dict()
    for exp in scenario.experiences:
        m = build_model("lenet5", num_classes=num_classes)
        m.load_state_dict(init)
        train_classifier(m, exp.train_x, exp.train_y, epochs=2, batch_size=16, lr=0.05,
                         generator=torch.Generator().manual_seed(exp.index))
        stream.append(Expert(m, exp.classes, arch="lenet5",
                             arch_kwargs={"num_classes": num_classes, "in_channels": 1},
                             meta={"input_shape": [1, 32, 32], "mean": [0.5], "std": [0.5],
                                   "experience": exp.index}))
    return ExpertStream(path)


def band_images(classes, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable toy (N, 1, 32, 32) images for the ExML tests: class c lights up the c-th horizontal band.

    Classes 0-6 fit; returns (x, y) with y int64, n_per_class samples of each class in order.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(list(classes), dtype=torch.int64).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 1, 32, 32, generator=g) * 0.3 - 1.0
    for r, c in enumerate(y.tolist()):
        x[r, 0, 4 * c + 2 : 4 * c + 6, 4:28] += 2.5
    return x, y


@contextlib.contextmanager
def no_warnings():
    """Every warning is an error inside the block (``warnings.catch_warnings(action="error")`` before 3.11)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@contextlib.contextmanager
def bench_module(name: str):
    """``benches/<name>.py`` imported as a module, with ``benches/`` on sys.path meanwhile (the scripts
    import their sibling ``benchlib``)."""
    benches = str(Path(__file__).resolve().parents[1] / "benches")
    sys.path.insert(0, benches)
    saved = sys.modules.get(name)
    try:
        spec = importlib.util.spec_from_file_location(name, f"{benches}/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses (and pickling) look a module's classes up by its name
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(benches)
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` meanwhile (the same kernels as a one-thread worker), then
    restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def mount_namespace() -> list[str] | None:
    """The command prefix that runs a process in a private mount namespace where it may mount a tmpfs (for
    the real full-disk and read-only tests): ``unshare -Urm`` (a user namespace: no root needed where the
    kernel allows them) or, for root, ``unshare -m``; None where neither can mount one (a container without
    the capability, no util-linux). The namespace and its mounts end with the process."""
    if os.name != "posix" or shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    prefixes = [["unshare", "-Urm"]] + ([["unshare", "-m"]] if os.geteuid() == 0 else [])
    probe = 'd=$(mktemp -d) && mount -t tmpfs -o size=8k tmpfs "$d" && umount "$d"; r=$?; rmdir "$d"; exit $r'
    for prefix in prefixes:
        try:
            r = subprocess.run([*prefix, "sh", "-c", probe], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return None


def fake_cifar10(folder, n_train: int = 6, n_test: int = 10) -> None:
    """Six pickles in the CIFAR-10 python layout (bytes keys, uint8 (N, 3072) rows R|G|B), labels i % 10; every
    image black but one green pixel at row 2, column 3."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = np.zeros((n, 3072), dtype=np.uint8)
        data[:, 1024 + 2 * 32 + 3] = 255  # green channel, row 2, column 3
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [i % 10 for i in range(n)], b"batch_label": name.encode()}, f,
                        protocol=2)
