"""exml_fast.checkpoint: save_model / load_model round trips and every refusal."""

from __future__ import annotations

import os

import pytest
import torch

from exml_fast.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    ModelInfo,
    load_model,
    save_model,
    state_dict_sha256,
)
from exml_fast.models import ARCHS, build_model

KW = dict(arch="lenet5bn", num_classes=10, in_channels=1, input_shape=(1, 32, 32))


def _trained_like_model(arch="lenet5bn", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(arch, **kw)
    # Non-default BN buffers, so a round trip that drops them would be caught.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.num_batches_tracked.fill_(17)
    return m.eval()


def _raw(payload, path):
    torch.save(payload, path)
    return path


def test_round_trip(tmp_path):
    m = _trained_like_model()
    path = tmp_path / "t.pt"
    names = [str(i) for i in range(10)]
    save_model(m, path, **KW, mean=0.1307, std=(0.3081,), classes=names,
               metadata={"dataset": "mnist", "test_accuracy": 0.98, "nested": {"a": [1, 2]}})
    m2, info = load_model(path)
    assert isinstance(info, ModelInfo)
    assert info == ModelInfo(arch="lenet5bn", num_classes=10, in_channels=1, input_shape=(1, 32, 32),
                             mean=(0.1307,), std=(0.3081,), classes=tuple(names),
                             metadata={"dataset": "mnist", "test_accuracy": 0.98, "nested": {"a": [1, 2]}})
    assert not m2.training
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert list(sd) == list(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(m(x), m2(x))
    assert os.listdir(tmp_path) == ["t.pt"]  # atomic write leaves no temporary file


def test_defaults_and_per_channel_stats(tmp_path):
    m = build_model("resnet18_cifar", num_classes=5, in_channels=3)
    # width is not an argument of build_model; the default-width net is what a checkpoint rebuilds.
    path = tmp_path / "r.pt"
    save_model(m, path, arch="resnet18_cifar", num_classes=5, in_channels=3, input_shape=[3, 32, 32],
               mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    _, info = load_model(path, map_location=torch.device("cpu"))
    assert info.mean == (0.49, 0.48, 0.45) and info.std == (0.25, 0.24, 0.26)
    assert info.classes is None and info.metadata == {}
    path2 = tmp_path / "n.pt"
    save_model(_trained_like_model(), path2, **KW)
    assert load_model(path2)[1].mean is None


def test_file_format_is_a_plain_dict(tmp_path):
    path = tmp_path / "t.pt"
    save_model(_trained_like_model(), path, **KW)
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == FORMAT and obj["version"] == VERSION == 1
    assert obj["sha256"] == state_dict_sha256(obj["state_dict"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(KW, arch="vgg"), "arch must be one of"),
        (dict(KW, num_classes=0), "num_classes must be an int >= 1"),
        (dict(KW, input_shape=(32, 32)), "input_shape must be"),
        (dict(KW, input_shape=(3, 32, 32)), "must equal in_channels"),
        (dict(KW, mean=(0.1, 0.2), std=0.3), "mean must have one value per input channel"),
        (dict(KW, mean=0.1), "both mean and std"),
        (dict(KW, mean=0.1, std=-1.0), "std must be > 0"),
        (dict(KW, classes=["a", "b"]), "classes must name each of the 10"),
        (dict(KW, metadata={"f": object()}), "metadata must be JSON-serialisable"),
    ],
)
def test_save_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_model(_trained_like_model(), tmp_path / "t.pt", **kwargs)
    assert not os.listdir(tmp_path)


def test_save_rejects_a_model_of_another_arch(tmp_path):
    with pytest.raises(CheckpointError, match="does not match arch 'lenet5bn'"):
        save_model(build_model("lenet5"), tmp_path / "t.pt", **KW)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        save_model(build_model("lenet5bn", num_classes=7), tmp_path / "t.pt", **KW)
    assert not os.listdir(tmp_path)


def _good_payload(tmp_path):
    path = tmp_path / "good.pt"
    save_model(_trained_like_model(), path, **KW)
    return torch.load(path, weights_only=True)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_model(tmp_path)


def test_load_truncated_and_garbage(tmp_path):
    good = tmp_path / "good.pt"
    save_model(_trained_like_model(), good, **KW)
    data = good.read_bytes()
    for name, blob in [("trunc.pt", data[: len(data) // 2]), ("empty.pt", b""), ("text.pt", b"hello world\n" * 10)]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match="corrupt or truncated|not an exml_fast"):
            load_model(tmp_path / name)


def test_load_detects_flipped_weight_bytes(tmp_path):
    payload = _good_payload(tmp_path)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first].view(-1)[0] += 1.0
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(_raw(payload, tmp_path / "bad.pt"))


def test_load_refuses_pickled_code(tmp_path):
    # A plain torch.save of a whole module pickles classes: weights_only refuses it.
    path = _raw(build_model("lenet5bn"), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_model(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: {"state_dict": p["state_dict"]}, "not an exml_fast model checkpoint"),
        (lambda p: [1, 2, 3], "not an exml_fast model checkpoint"),
        (lambda p: dict(p, format="other"), "not an exml_fast model checkpoint"),
        (lambda p: dict(p, version=2), "unknown checkpoint format version 2"),
        (lambda p: dict(p, arch="vgg"), "unknown arch 'vgg'"),
        (lambda p: dict(p, num_classes=7), "does not match arch"),
        (lambda p: {k: v for k, v in p.items() if k != "sha256"}, "'sha256' is missing"),
    ],
)
def test_load_rejects_bad_contents(tmp_path, edit, match):
    payload = edit(_good_payload(tmp_path))
    with pytest.raises(CheckpointError, match=match):
        load_model(_raw(payload, tmp_path / "bad.pt"))


def test_load_rejects_extra_or_missing_weights_even_with_a_matching_hash(tmp_path):
    payload = _good_payload(tmp_path)
    sd = dict(payload["state_dict"])
    sd["extra.weight"] = torch.zeros(3)
    first = next(iter(sd))
    del sd[first]
    payload.update(state_dict=sd, sha256=state_dict_sha256(sd))
    with pytest.raises(CheckpointError, match=rf"missing \['{first}'\].*unexpected \['extra.weight'\]"):
        load_model(_raw(payload, tmp_path / "bad.pt"))


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if a == "resnet34_cifar" else a for a in ARCHS],
)
def test_every_registered_arch_round_trips(tmp_path, arch):
    x = torch.randn(2, 1, 32, 32)
    torch.manual_seed(1)
    m = build_model(arch, num_classes=3, in_channels=1).eval()
    path = tmp_path / f"{arch}.pt"
    save_model(m, path, arch=arch, num_classes=3, in_channels=1, input_shape=(1, 32, 32))
    m2, info = load_model(path)
    assert info.arch == arch
    with torch.no_grad():
        assert torch.equal(m(x), m2(x)), arch
