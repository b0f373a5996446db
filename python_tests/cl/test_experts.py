"""exml_fast.cl.experts: Expert save/load in both formats, integrity checks, ExpertStream order, resume and laziness."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import weakref

import pytest
import torch
from torch import nn

from exml_fast.cl.experts import Expert, ExpertError, ExpertStream
from exml_fast.models import build_model

# The GPU machine has no safetensors: tests there use the torch format.
try:
    import safetensors.torch  # noqa: F401
    HAS_SAFETENSORS = True
except ImportError:
    HAS_SAFETENSORS = False
FMT = "safetensors" if HAS_SAFETENSORS else "torch"
WEIGHTS = {"safetensors": "weights.safetensors", "torch": "weights.pt"}[FMT]
needs_safetensors = pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors not installed")
SAFETENSORS = pytest.param("safetensors", marks=needs_safetensors)

KW = {"num_classes": 10, "in_channels": 1}
META = {"input_shape": [1, 32, 32], "mean": [0.1307], "std": [0.3081], "dataset": "mnist", "experience": 1}


def _model(seed: int = 0, arch: str = "lenet5", **kw) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, **{**KW, **kw})


def _expert(seed: int = 0, classes=(3, 7), task_id=None, arch: str = "lenet5", **kw) -> Expert:
    return Expert(_model(seed, arch, **kw), classes, arch=arch, arch_kwargs={**KW, **kw}, task_id=task_id,
                  meta=META)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------- Expert


@pytest.mark.parametrize("weights_format", [SAFETENSORS, "torch"])
def test_save_load_round_trip(tmp_path, weights_format):
    file_name = {"safetensors": "weights.safetensors", "torch": "weights.pt"}[weights_format]
    expert = _expert(seed=1, classes=(7, 3), task_id=2)
    out = expert.save(tmp_path / "e", weights_format=weights_format)
    assert out == tmp_path / "e"
    assert sorted(os.listdir(out)) == sorted(["manifest.json", file_name])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256((out / file_name).read_bytes()).hexdigest()
    assert manifest["weights"] == file_name and manifest["arch"] == "lenet5" and manifest["classes"] == [7, 3]

    loaded = Expert.load(out)
    assert _same_weights(loaded.model, expert.model)
    assert not loaded.model.training
    assert loaded.classes == (7, 3) and loaded.task_id == 2 and loaded.arch == "lenet5"
    assert loaded.arch_kwargs == KW and loaded.meta == META and loaded.num_classes == 10
    assert loaded.input_shape == (1, 32, 32) and loaded.mean == (0.1307,) and loaded.std == (0.3081,)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), expert.model.eval()(x))


def test_extra_arch_kwargs_and_buffers_round_trip(tmp_path):
    expert = _expert(seed=2, arch="resnet18_cifar", width=2, classes=(0, 1, 2))
    with torch.no_grad():  # make the BN running statistics non-default so that buffers are checked too
        expert.model.train()(torch.randn(4, 1, 32, 32))
    loaded = Expert.load(expert.save(tmp_path / "r", weights_format=FMT))
    assert loaded.arch_kwargs == {"num_classes": 10, "in_channels": 1, "width": 2}
    assert _same_weights(loaded.model, expert.model)
    assert loaded.model.stem[0].out_channels == 2


def test_loading_does_not_move_the_global_generator(tmp_path):
    folder = _expert().save(tmp_path / "e", weights_format=FMT)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Expert.load(folder)
    assert torch.equal(torch.rand(3), expected)


def test_arch_kwargs_are_read_off_the_model_when_omitted():
    e = Expert(build_model("lenet5", num_classes=6, in_channels=3), [5], arch="lenet5")
    assert e.arch_kwargs == {"num_classes": 6, "in_channels": 3}
    assert e.input_shape is None and e.mean is None and e.std is None and e.meta == {}


@pytest.mark.parametrize("kwargs,match", [
    ({"classes": (1, 1)}, "distinct"),
    ({"classes": (1, 10)}, r"in \[0, 10\).*\[10\]"),
    ({"classes": ()}, "at least one"),
    ({"classes": (1.0,)}, "ints"),
    ({"arch": "vgg"}, "arch must be one of"),
    ({"arch_kwargs": {"num_classes": 10}}, r"arch_kwargs\['in_channels'\]"),
    ({"task_id": -1}, "task_id"),
    ({"meta": {"x": object()}}, "meta must be JSON-serialisable"),
])
def test_expert_argument_errors(kwargs, match):
    args = {"classes": (1,), "arch": "lenet5", "arch_kwargs": KW, **kwargs}
    with pytest.raises(ValueError, match=match):
        Expert(_model(), args.pop("classes"), **args)


def test_save_refuses_a_model_that_is_not_its_arch(tmp_path):
    expert = Expert(_model(), (0,), arch="lenet5_bn", arch_kwargs=KW)
    with pytest.raises(ExpertError, match="does not match arch 'lenet5_bn'"):
        expert.save(tmp_path / "e")
    assert not (tmp_path / "e" / "manifest.json").exists()
    with pytest.raises(ValueError, match="weights_format must be one of"):
        _expert().save(tmp_path / "e", weights_format="npz")


@pytest.mark.parametrize("weights_format", [SAFETENSORS, "torch"])
def test_corrupted_weights_byte_names_the_file(tmp_path, weights_format):
    folder = _expert().save(tmp_path / "e", weights_format=weights_format)
    path = folder / ("weights.safetensors" if weights_format == "safetensors" else "weights.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ExpertError, match=f"{path}: sha256 .* does not match"):
        Expert.load(folder)


def test_manifest_arch_mismatch(tmp_path):
    folder = _expert().save(tmp_path / "e", weights_format=FMT)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["arch"] = "lenet5_half"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertError, match=rf"{WEIGHTS}.*does not match arch 'lenet5_half'"):
        Expert.load(folder)
    manifest["arch"] = "no_such_net"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertError, match=r"manifest\.json: unknown arch 'no_such_net'"):
        Expert.load(folder)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ExpertError, match=r"manifest\.json: missing"):
        Expert.load(tmp_path / "nowhere")
    folder = _expert().save(tmp_path / "e", weights_format="torch")
    (folder / "weights.pt").rename(folder / "other.pt")
    with pytest.raises(ExpertError, match=r"weights\.pt: missing"):
        Expert.load(folder)
    (folder / "other.pt").rename(folder / "weights.pt")
    with pytest.raises(ExpertError, match="is not the expected"):
        Expert.load(folder, expected_sha256="0" * 64)
    (folder / "manifest.json").write_text('{"format": "exml_fast.expert", "version": 1, "ar')
    with pytest.raises(ExpertError, match=r"manifest\.json: not a readable expert manifest"):
        Expert.load(folder)
    (folder / "manifest.json").write_text(json.dumps({"format": "exml_fast.expert", "version": 7}))
    with pytest.raises(ExpertError, match="unknown expert format version 7"):
        Expert.load(folder)


def test_pickled_code_is_never_loaded(tmp_path):
    folder = _expert().save(tmp_path / "e", weights_format="torch")
    path = folder / "weights.pt"
    torch.save({"weight": nn.Linear(2, 2)}, path)  # a module object, not tensors: weights_only refuses it
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertError, match=r"weights\.pt: not a readable torch weights file: it holds Python objects"):
        Expert.load(folder)


def test_registered_arch_round_trip(tmp_path, monkeypatch):
    from exml_fast import models

    monkeypatch.setattr(models, "ARCHS", dict(models.ARCHS))

    def mlp(num_classes=10, in_channels=1, hidden=4):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, hidden), nn.Linear(hidden, num_classes))

    models.register_arch("mlp", mlp)
    e = Expert(mlp(num_classes=4, hidden=3), (0, 2), arch="mlp", arch_kwargs={"num_classes": 4, "in_channels": 1,
                                                                             "hidden": 3})
    loaded = Expert.load(e.save(tmp_path / "m", weights_format=FMT))
    assert _same_weights(loaded.model, e.model) and loaded.model[1].out_features == 3


# ------------------------------------------------------------------------------------------------ ExpertStream


def _stream(tmp_path, n=3, weights_format=FMT) -> ExpertStream:
    stream = ExpertStream.create(tmp_path / "s", meta={"scenario": {"name": "toy", "n": n}})
    for i in range(n):
        stream.append(_expert(seed=i, classes=(2 * i, 2 * i + 1), task_id=i), weights_format=weights_format)
    return stream


def test_stream_round_trip(tmp_path):
    made = _stream(tmp_path, n=3)
    stream = ExpertStream(tmp_path / "s")
    assert len(stream) == 3 and stream.meta == {"scenario": {"name": "toy", "n": 3}}
    assert [stream.classes(i) for i in range(3)] == [(0, 1), (2, 3), (4, 5)]
    assert [stream.task_id(i) for i in range(3)] == [0, 1, 2]
    assert [e["dir"] for e in stream.entries] == ["expert_000", "expert_001", "expert_002"]
    assert stream.entries == made.entries
    stream.entries[0]["classes"] = [9]  # copies: the stream is not changed through them
    stream.meta["scenario"] = None
    assert stream.classes(0) == (0, 1) and stream.meta["scenario"]["n"] == 3
    for i, expert in enumerate(stream):
        assert _same_weights(expert.model, _model(seed=i)) and expert.classes == (2 * i, 2 * i + 1)
    assert stream[-1].classes == (4, 5)
    with pytest.raises(IndexError, match="index 3 out of range"):
        stream[3]


def test_create_existing_stream(tmp_path):
    _stream(tmp_path, n=1)
    with pytest.raises(FileExistsError, match="stream.json: an expert stream already exists"):
        ExpertStream.create(tmp_path / "s", meta={"scenario": {"name": "toy", "n": 1}})
    again = ExpertStream.create(tmp_path / "s", meta={"scenario": {"name": "toy", "n": 1}}, exist_ok=True)
    assert len(again) == 1
    with pytest.raises(ValueError, match=r"differing keys.*scenario\.n: 1 vs 2.*scenario\.x: <absent> vs 'y'"):
        ExpertStream.create(tmp_path / "s", meta={"scenario": {"name": "toy", "n": 2, "x": "y"}}, exist_ok=True)


def test_swapped_expert_folders_are_detected(tmp_path):
    _stream(tmp_path, n=2)
    s = tmp_path / "s"
    shutil.move(s / "expert_000", s / "tmp")
    shutil.move(s / "expert_001", s / "expert_000")
    shutil.move(s / "tmp", s / "expert_001")
    stream = ExpertStream(s)
    with pytest.raises(ExpertError, match=rf"expert_000/{WEIGHTS}: sha256 .* is not the expected"):
        stream[0]
    with pytest.raises(ExpertError, match=rf"expert_001/{WEIGHTS}"):
        stream[1]
    with pytest.raises(ExpertError):
        list(stream)


def test_manifest_edited_against_the_stream(tmp_path):
    _stream(tmp_path, n=1)
    path = tmp_path / "s" / "expert_000" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["classes"] = [0, 1, 2]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ExpertError, match=r"expert_000/manifest\.json: classes/task_id/arch .* differ"):
        ExpertStream(tmp_path / "s")[0]


def test_bad_stream_json(tmp_path):
    with pytest.raises(ExpertError, match=r"stream\.json: missing"):
        ExpertStream(tmp_path)
    (tmp_path / "stream.json").write_text("[1, 2]")
    with pytest.raises(ExpertError, match=r"stream\.json: not an expert stream file \(a JSON list"):
        ExpertStream(tmp_path)
    _stream(tmp_path, n=2)
    spath = tmp_path / "s" / "stream.json"
    obj = json.loads(spath.read_text())
    obj["experts"][1]["dir"] = "expert_007"
    spath.write_text(json.dumps(obj))
    with pytest.raises(ExpertError, match=r"experts\[1\] dir is 'expert_007'"):
        ExpertStream(tmp_path / "s")
    del obj["experts"][1]["sha256"]
    spath.write_text(json.dumps(obj))
    with pytest.raises(ExpertError, match=r"experts\[1\] field 'sha256'"):
        ExpertStream(tmp_path / "s")


def test_a_crash_before_stream_json_leaves_the_old_stream(tmp_path):
    stream = _stream(tmp_path, n=1)
    # What append leaves when killed after writing the expert folder but before stream.json:
    _expert(seed=5, classes=(9,)).save(tmp_path / "s" / "expert_001", weights_format=FMT)
    reopened = ExpertStream(tmp_path / "s")
    assert len(reopened) == 1 and reopened[0].classes == (0, 1)
    reopened.append(_expert(seed=6, classes=(8,)), weights_format=FMT)
    assert len(ExpertStream(tmp_path / "s")) == 2
    assert _same_weights(ExpertStream(tmp_path / "s")[1].model, _model(seed=6))
    assert len(stream) == 1  # another handle keeps what it read


def test_iteration_is_lazy(tmp_path):
    _stream(tmp_path, n=3, weights_format="torch")
    it = iter(ExpertStream(tmp_path / "s"))
    first = next(it)
    ref, model_ref = weakref.ref(first), weakref.ref(first.model)
    del first
    second = next(it)
    assert ref() is None and model_ref() is None  # collected by reference counting alone
    assert second.classes == (2, 3)
    ref2 = weakref.ref(second)
    del second
    assert next(it).classes == (4, 5) and ref2() is None
    with pytest.raises(StopIteration):
        next(it)


def test_missing_safetensors_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install safetensors.*weights_format='torch'"):
        _expert().save(tmp_path / "e")
