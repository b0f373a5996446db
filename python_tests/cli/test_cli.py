"""The exml-fast command line, run in-process through exml_fast.cli.main."""

from __future__ import annotations

import os
import runpy
import sys

import pytest
import torch

from exml_fast import data
from exml_fast.checkpoint import load_model
from exml_fast.cli import main

pytestmark = pytest.mark.skipif(
    data.find_data_root("mnist") is None or data.find_data_root("fashion-mnist") is None,
    reason="MNIST / Fashion-MNIST files not found (set EXML_FAST_DATA)",
)

N = 20
BATCH = 10


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "mnist.pt")
    rc = main(["train-teacher", "--dataset", "mnist", "--arch", "lenet5bn", "--limit", "2000", "--epochs", "1",
               "--seed", "0", "--out", path, "--device", "cpu"])
    assert rc == 0
    return path


def _synth(teacher, out, method="deepinversion", *extra):
    args = ["synthesize", "--teacher", teacher, "--method", method, "-n", str(N), "--batch-size", str(BATCH),
            "--out", str(out), "--device", "cpu", "--seed", "3", "--no-progress"]
    if method != "auxiliary":
        args += ["--iterations", "5"]
    return main(args + list(extra))


def _shard_tensors(folder):
    names = sorted(n for n in os.listdir(folder) if n.startswith("shard_"))
    return {n: torch.load(os.path.join(folder, n), weights_only=True) for n in names}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_train_teacher_writes_a_checkpoint(teacher, capsys):
    model, info = load_model(teacher)
    assert info.arch == "lenet5bn" and info.num_classes == 10 and info.in_channels == 1
    assert info.input_shape == (1, 32, 32)
    assert info.mean == (data.DATASET_STATS["mnist"][0],) and info.std == (data.DATASET_STATS["mnist"][1],)
    assert info.classes == tuple(str(i) for i in range(10))
    md = info.metadata
    assert md["dataset"] == "mnist" and md["train_images"] == 2000 and md["epochs"] == 1
    # One epoch on 2000 images reaches ~0.85-0.9; chance is 0.1.
    assert md["test_accuracy"] > 0.6
    x, y = data.mnist_tensors("test", pad_to=32, normalize=True)
    with torch.no_grad():
        acc = (model(x[:2000]).argmax(1) == y[:2000]).float().mean().item()
    assert acc > 0.6


@pytest.mark.parametrize("method", ["deepinversion", "model-inversion", "data-impressions", "auxiliary"])
def test_synthesize_each_method(teacher, tmp_path, capsys, method):
    from exml_fast.synth import load_synthetic

    out = tmp_path / method
    assert _synth(teacher, out, method) == 0
    printed = capsys.readouterr().out
    assert f"{N} images in {out} ({N} made by this run" in printed
    assert "images/s" in printed
    assert ("mean teacher confidence" if method == "auxiliary" else "mean teacher accuracy") in printed
    batch = load_synthetic(out)
    assert len(batch) == N and batch.x.shape == (N, 1, 32, 32)
    assert batch.mean == (data.DATASET_STATS["mnist"][0],)
    assert int(batch.y.min()) >= 0 and int(batch.y.max()) < 10
    if method in ("deepinversion", "model-inversion", "data-impressions"):
        assert torch.equal(batch.y, torch.arange(N) % 10)  # balanced, cycling through the classes
        assert batch.losses["teacher_acc"].shape == (N // BATCH,)
    if method in ("data-impressions", "auxiliary"):
        assert batch.soft_targets is not None and batch.soft_targets.shape == (N, 10)
    with open(out / "grid.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_synthesize_classes_and_no_grid(teacher, tmp_path):
    from exml_fast.synth import load_synthetic

    out = tmp_path / "c"
    assert _synth(teacher, out, "model-inversion", "--classes", "2,7", "--no-grid") == 0
    assert set(load_synthetic(out).y.tolist()) == {2, 7}
    assert not (out / "grid.png").exists()


def test_synthesize_deepinversion_presets(teacher, tmp_path, capsys):
    import json

    from exml_fast.synth import DEEPINVERSION_PRESETS

    def job_config(out):
        with open(out / "manifest.json") as f:
            return json.load(f)["job"]["config"]

    # An MNIST teacher gets the "digits" preset: the settings this command has always used for it.
    assert _synth(teacher, tmp_path / "d") == 0
    assert "deepinversion, preset digits:" in capsys.readouterr().out
    cfg = job_config(tmp_path / "d")
    digits = DEEPINVERSION_PRESETS["digits"]
    assert cfg["preset"] == "digits" and cfg["bn_weight"] == digits["bn_weight"] == 1.0
    assert cfg["first_bn_multiplier"] == 10.0 and cfg["priors"]["tv_l2"] == 0.05 and cfg["priors"]["l2_sq"] == 1e-3
    assert cfg["lr"] == 0.1 and cfg["schedule"] == "constant" and not cfg["flip"] and cfg["jitter"] == 2
    # --preset picks another one; --lr still wins over it.
    assert _synth(teacher, tmp_path / "a", "deepinversion", "--preset", "auto", "--lr", "0.2") == 0
    cfg = job_config(tmp_path / "a")
    assert cfg["preset"] == "auto" and cfg["lr"] == 0.2 and 0 < cfg["bn_weight"] < 1 and not cfg["flip"]
    assert _synth(teacher, tmp_path / "c", "deepinversion", "--preset", "cifar10") == 0
    cfg = job_config(tmp_path / "c")
    assert cfg["preset"] == "cifar" and cfg["bn_weight"] == 10.0 and cfg["flip"]
    capsys.readouterr()
    assert _synth(teacher, tmp_path / "m", "model-inversion", "--preset", "digits") == 2
    assert "--preset: only used by --method deepinversion" in capsys.readouterr().err
    assert _synth(teacher, tmp_path / "x", "deepinversion", "--preset", "mnist") == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_synthesize_resume_is_deterministic_and_does_no_new_work(teacher, tmp_path, capsys):
    out = tmp_path / "r"
    assert _synth(teacher, out) == 0
    first = _shard_tensors(out)
    stats = {n: os.stat(out / n).st_mtime_ns for n in first}
    assert len(first) == N // BATCH
    capsys.readouterr()

    # The same command again: everything is on disk, nothing is recomputed or rewritten.
    assert _synth(teacher, out) == 0
    assert f"{N} images in {out} (0 made by this run, {N} on disk before)" in capsys.readouterr().out
    assert {n: os.stat(out / n).st_mtime_ns for n in first} == stats

    # An interrupted job (its last shard missing) resumes with exactly the images it would have made.
    last = sorted(first)[-1]
    os.unlink(out / last)
    assert _synth(teacher, out) == 0
    assert f"({BATCH} made by this run, {N - BATCH} on disk before)" in capsys.readouterr().out
    again = _shard_tensors(out)
    assert again.keys() == first.keys()
    for n in first:
        # the same images, targets and losses; the redone shard's synthesis time is its own
        assert first[n].pop("seconds") > 0 and again[n].pop("seconds") > 0
        _assert_same_state(first[n], again[n])


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_arguments_exit_2(teacher, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["synthesize", "--teacher", teacher, "-n", "4", "--out", out, "--device", "cpu", "--no-progress"]
    assert main(base + ["--method", "gan"]) == 2
    assert "invalid choice: 'gan'" in _err(capsys)
    assert main(base + ["--method", "deepinversion", "--cuda-graph"]) == 2
    assert "--cuda-graph needs a CUDA device" in _err(capsys)
    assert main(base + ["--method", "deepinversion", "--classes", "0,12"]) == 2
    assert "--classes: the teacher has 10 classes" in _err(capsys)
    assert main(base + ["--method", "deepinversion", "--classes", "a,b"]) == 2
    assert "comma-separated class indices" in _err(capsys)
    assert main(base + ["--method", "auxiliary", "--iterations", "3"]) == 2
    assert "--iterations: not used by --method auxiliary" in _err(capsys)
    assert main(base + ["--method", "deepinversion", "--aux-dataset", "mnist"]) == 2
    assert "--aux-dataset: only used by --method auxiliary" in _err(capsys)
    assert main(["synthesize", "--teacher", teacher, "--method", "deepinversion", "-n", "0", "--out", out]) == 2
    assert "expected a positive integer, got 0" in _err(capsys)
    assert main(["train-teacher", "--epochs", "0", "--out", out]) == 2
    assert main(["train-teacher", "--dataset", "cifar10", "--out", out]) == 2
    assert main([]) == 2
    assert not os.path.exists(out)  # nothing was started


def test_runtime_errors_exit_1_with_one_line(teacher, tmp_path, capsys):
    out = str(tmp_path / "o")
    missing = str(tmp_path / "missing.pt")
    assert main(["synthesize", "--teacher", missing, "--method", "deepinversion", "-n", "4", "--out", out]) == 1
    err = _err(capsys)
    assert err.count("\n") == 1 and "exml-fast: error:" in err and "missing.pt" in err and "does not exist" in err

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert main(["synthesize", "--teacher", str(junk), "--method", "deepinversion", "-n", "4", "--out", out]) == 1
    err = _err(capsys)
    assert err.count("\n") == 1 and "corrupt or truncated" in err

    # A folder holding another job is refused, not overwritten.
    assert _synth(teacher, out) == 0
    capsys.readouterr()
    assert _synth(teacher, out, "deepinversion", "--lr", "0.05") == 1
    err = _err(capsys)
    assert err.count("\n") == 1 and "holds a different synthesis job" in err


def test_python_dash_m_runs_main(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["exml-fast", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("exml_fast", run_name="__main__")
    assert e.value.code == 0
    assert "train-teacher" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_synthesize_cuda_graph_bf16(teacher, tmp_path, capsys):
    from exml_fast.synth import load_synthetic

    out = tmp_path / "g"
    rc = main(["synthesize", "--teacher", teacher, "--method", "deepinversion", "-n", "64", "--batch-size", "32",
               "--iterations", "20", "--out", str(out), "--device", "cuda", "--cuda-graph", "--precision", "bf16",
               "--channels-last", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert len(load_synthetic(out)) == 64


def test_a_rank_that_left_its_torchrun_group_ends_without_the_interpreters_teardown(monkeypatch, capsys):
    """Under torchrun, once its group is destroyed, main ends the process with os._exit(status) after flushing
    (gloo may abort a rank in the teardown); outside torchrun it returns the status as always."""
    import exml_fast.cli as cli
    from exml_fast.cli.common import left_torchrun_group

    assert not left_torchrun_group()
    assert main(["reproduce", "zskd-mnist", "--methods", "dafl"]) == 2  # no group joined: returns

    class Exited(Exception):
        pass

    def fake_exit(status):
        raise Exited(status)

    monkeypatch.setattr(cli, "left_torchrun_group", lambda: True)
    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(Exited) as info:
        main(["reproduce", "zskd-mnist", "--methods", "dafl"])
    assert info.value.args == (2,)
    assert "--methods is for dfkd-mnist" in capsys.readouterr().err  # written before the exit
