"""exml_fast.cl.scenarios: class partition and order, sizes, MT heads, CIFAR-10 files, and train_experts
(shared initialisation, determinism, resume, configuration mismatch, head-only training)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from _util import fake_cifar10

from exml_fast.cl import scenarios as sc
from exml_fast.cl.experts import ExpertStream
from exml_fast.cl.scenarios import (SCENARIOS, Experience, Scenario, joint_mnist, make_scenario, split_cifar10,
                                    split_fashion_mnist, split_mnist, train_experts)
from exml_fast.data import find_data_root
from exml_fast.models import build_model

# Samples per class in the original MNIST files.
MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

needs_mnist = pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")
needs_fashion = pytest.mark.skipif(find_data_root("fashion-mnist") is None,
                                   reason="Fashion-MNIST files not found (set EXML_FAST_DATA)")


# ------------------------------------------------------------------------------------------- class order


def test_class_order_is_a_seeded_permutation():
    orders = {seed: sc.class_order(10, seed) for seed in range(5)}
    assert all(sorted(o) == list(range(10)) for o in orders.values())
    assert orders[0] == sc.class_order(10, 0)
    assert len(set(orders.values())) == 5  # every seed, 0 included, permutes differently here
    assert orders[0] != tuple(range(10))


@pytest.mark.parametrize("n,sizes", [(5, [2] * 5), (3, [4, 3, 3]), (4, [3, 3, 2, 2]), (10, [1] * 10), (1, [10])])
def test_partition_distributes_the_remainder_first(n, sizes):
    order = sc.class_order(10, 3)
    blocks = sc._partition(order, n)
    assert [len(b) for b in blocks] == sizes
    assert [c for b in blocks for c in b] != [] and sorted(c for b in blocks for c in b) == list(range(10))
    start = 0
    for b in blocks:  # consecutive blocks of the order, each stored sorted
        assert b == tuple(sorted(order[start:start + len(b)]))
        start += len(b)


# ------------------------------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist5():
    return split_mnist(5, seed=0)


@needs_mnist
def test_split_mnist_partition_and_sizes(mnist5):
    s = mnist5
    assert (s.name, s.dataset, s.num_classes, s.input_shape, s.multi_task) == ("split_mnist", "mnist", 10,
                                                                               (1, 32, 32), False)
    assert s.class_order == sc.class_order(10, 0) and len(s) == 5
    assert [e.classes for e in s] == sc._partition(s.class_order, 5)
    for i, e in enumerate(s):
        assert e.index == i and e.task_id is None and len(e.classes) == 2
        assert set(e.train_y.unique().tolist()) == set(e.classes) == set(e.test_y.unique().tolist())
        assert e.num_train == sum(MNIST_TRAIN[c] for c in e.classes)
        assert e.num_test == sum(MNIST_TEST[c] for c in e.classes)
        assert e.train_x.dtype == torch.float32 and e.train_x.shape[1:] == (1, 32, 32)
    assert sum(e.num_train for e in s) == 60000
    e = s[0]
    background = -0.1307 / 0.3081  # padding is 0 before normalisation
    assert torch.allclose(e.train_x[:, :, :2, :], torch.tensor(background))
    assert abs(e.train_x.mean().item()) < 0.5 and e.train_x.max().item() == pytest.approx((1 - 0.1307) / 0.3081)
    assert s.task_heads() is None


@needs_mnist
def test_describe_test_set_and_rebuild(mnist5):
    d = mnist5.describe()
    assert json.loads(json.dumps(d)) == d  # JSON-able, no tensors
    assert d["experiences"][2] == {"index": 2, "classes": list(mnist5[2].classes), "task_id": None,
                                   "train_size": mnist5[2].num_train, "test_size": mnist5[2].num_test}
    assert d["kwargs"] == {"n_experiences": 5, "seed": 0}
    x, y, ids = mnist5.test_set()
    assert x.shape == (10000, 1, 32, 32) and ids.tolist() == sorted(ids.tolist())
    first = mnist5[0].num_test
    assert torch.equal(y[:first], mnist5[0].test_y) and torch.equal(x[first:first + 5], mnist5[1].test_x[:5])
    assert torch.bincount(ids).tolist() == [e.num_test for e in mnist5]
    again = make_scenario(d["name"], **d["kwargs"])
    assert again.describe() == d and torch.equal(again[3].train_x, mnist5[3].train_x)


@needs_mnist
def test_split_mnist_mt_caps_and_heads():
    s = SCENARIOS["split_mnist_mt"](n_experiences=3, seed=1, max_train_per_experience=50, max_test_per_experience=20)
    assert s.name == "split_mnist_mt" and s.multi_task and [len(e.classes) for e in s] == [4, 3, 3]
    assert [e.task_id for e in s] == [0, 1, 2] and [e.num_train for e in s] == [50] * 3
    assert [e.num_test for e in s] == [20] * 3
    heads = s.task_heads()
    assert heads.dtype == torch.bool and heads.shape == (3, 10)
    assert heads.sum(0).tolist() == [1] * 10  # each class in exactly one head
    assert [torch.nonzero(h).flatten().tolist() for h in heads] == [list(e.classes) for e in s]
    assert s.describe()["kwargs"] == {"n_experiences": 3, "seed": 1, "max_train_per_experience": 50,
                                      "max_test_per_experience": 20}
    x, y, ids = s.test_set()
    assert all(heads[t, c] for t, c in zip(ids.tolist(), y.tolist()))


@needs_mnist
def test_joint_mnist():
    s = joint_mnist(max_test_per_experience=10)
    assert s.name == "joint_mnist" and len(s) == 1 and s[0].classes == tuple(range(10))
    assert s[0].num_train == 60000 and s[0].num_test == 10
    with pytest.raises(ValueError, match="joint_mnist: n_experiences must be 1"):
        make_scenario("joint_mnist", n_experiences=2)


@needs_mnist
def test_validation_split_is_held_out_of_training_and_the_same_for_every_seed():
    full = joint_mnist()
    val = joint_mnist(validation_size=10000, eval_split="validation")
    held = sc.validation_indices(60000, 10000)
    assert val[0].num_train == 50000 and val[0].num_test == 10000
    assert torch.equal(val[0].test_x, full[0].train_x[held]) and torch.equal(val[0].test_y, full[0].train_y[held])
    kept = torch.ones(60000, dtype=torch.bool)
    kept[held] = False
    assert torch.equal(val[0].train_x, full[0].train_x[kept])  # no held-out image is trained on
    test = joint_mnist(validation_size=10000)  # same training data, evaluated on the test set
    assert torch.equal(test[0].train_y, val[0].train_y) and torch.equal(test[0].test_y, full[0].test_y)
    a = split_mnist(5, seed=0, validation_size=10000, eval_split="validation")
    b = split_mnist(5, seed=3, validation_size=10000, eval_split="validation")
    assert a.num_classes == b.num_classes and sum(e.num_test for e in a) == sum(e.num_test for e in b) == 10000
    assert sorted(torch.cat([e.test_y for e in a]).tolist()) == sorted(torch.cat([e.test_y for e in b]).tolist())
    kw = a.describe()["kwargs"]
    assert kw["validation_size"] == 10000 and kw["eval_split"] == "validation"
    rebuilt = make_scenario("split_mnist", **kw)
    assert torch.equal(rebuilt[1].test_x, a[1].test_x)
    with pytest.raises(ValueError, match="eval_split='validation' needs validation_size"):
        split_mnist(5, eval_split="validation")
    with pytest.raises(ValueError, match="eval_split must be one of test, validation; got 'val'"):
        split_mnist(5, validation_size=10, eval_split="val")
    with pytest.raises(ValueError, match=r"validation_size must be an int in \[1, 59999\]; got 60000"):
        split_mnist(5, validation_size=60000)


@needs_fashion
def test_split_fashion_mnist():
    s = split_fashion_mnist(2, seed=0, max_train_per_experience=10, max_test_per_experience=10)
    assert s.dataset == "fashion-mnist" and s.mean == (0.2860,) and s.std == (0.3530,)
    assert [len(e.classes) for e in s] == [5, 5] and s.name == "split_fashion_mnist"
    assert SCENARIOS["split_fashion_mnist_mt"](n_experiences=2, max_train_per_experience=1,
                                               max_test_per_experience=1).name == "split_fashion_mnist_mt"


def test_argument_errors():
    with pytest.raises(ValueError, match=r"make_scenario: name must be one of split_mnist, split_mnist_mt, .*; "
                                         r"got 'split_svhn'"):
        make_scenario("split_svhn")
    with pytest.raises(ValueError, match=r"n_experiences must be an int in \[1, 10\]; got 11"):
        split_mnist(11)
    with pytest.raises(ValueError, match="n_experiences"):
        split_cifar10(0)
    assert set(SCENARIOS) == {"split_mnist", "split_mnist_mt", "joint_mnist", "split_fashion_mnist",
                              "split_fashion_mnist_mt", "split_cifar10", "split_cifar10_mt", "split_cifar100",
                              "split_cifar100_mt"}


# ---------------------------------------------------------------------------------------------- CIFAR-10




def test_split_cifar10_from_fake_pickles(tmp_path):
    fake_cifar10(tmp_path / "cifar-10-batches-py")
    s = split_cifar10(5, seed=0, root=tmp_path)
    assert s.dataset == "cifar10" and s.input_shape == (3, 32, 32) and len(s) == 5
    assert sum(e.num_train for e in s) == 30 and sum(e.num_test for e in s) == 10
    x = s[0].train_x
    mean, std = torch.tensor(sc.CIFAR10_MEAN), torch.tensor(sc.CIFAR10_STD)
    assert torch.allclose(x[0, 1, 2, 3], (1 - mean[1]) / std[1])
    assert torch.allclose(x[0, 0, 2, 3], -mean[0] / std[0]) and torch.allclose(x[0, 1, 3, 2], -mean[1] / std[1])
    mt = SCENARIOS["split_cifar10_mt"](n_experiences=2, root=tmp_path / "cifar-10-batches-py")
    assert mt.multi_task and mt.name == "split_cifar10_mt" and mt.task_heads().shape == (2, 10)


def test_split_cifar10_found_through_the_environment(tmp_path, monkeypatch):
    fake_cifar10(tmp_path / "cifar10")
    monkeypatch.setenv("EXML_FAST_DATA", str(tmp_path))
    assert split_cifar10(2).dataset == "cifar10"


# ---------------------------------------------------------------------------------------------- CIFAR-100


def _fake_cifar100(folder, n_train=200, n_test=100):
    """train and test pickles in the CIFAR-100 python layout (bytes keys, uint8 (N, 3072) rows, fine labels
    i % 100, coarse labels i % 20), as the archive holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        data = np.zeros((n, 3072), dtype=np.uint8)
        data[:, 2 * 1024 + 5 * 32 + 7] = 255  # blue channel, row 5, column 7
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [i % 100 for i in range(n)],
                         b"coarse_labels": [i % 20 for i in range(n)], b"filenames": [b"x.png"] * n,
                         b"batch_label": name.encode()}, f, protocol=2)


def test_split_cifar100_from_fake_pickles(tmp_path):
    _fake_cifar100(tmp_path / "cifar-100-python")
    s = sc.split_cifar100(seed=3, root=tmp_path)
    assert s.dataset == "cifar100" and s.num_classes == 100 and s.input_shape == (3, 32, 32) and len(s) == 10
    assert [len(e.classes) for e in s] == [10] * 10 and s.class_order == sc.class_order(100, 3)
    assert sum(e.num_train for e in s) == 200 and sum(e.num_test for e in s) == 100
    assert all(set(e.train_y.tolist()) == set(e.classes) for e in s)
    mean, std = torch.tensor(sc.CIFAR100_MEAN), torch.tensor(sc.CIFAR100_STD)
    x = s[0].train_x
    assert torch.allclose(x[0, 2, 5, 7], (1 - mean[2]) / std[2]) and torch.allclose(x[0, 0, 0, 0], -mean[0] / std[0])
    mt = SCENARIOS["split_cifar100_mt"](root=tmp_path)  # the factory's own default: 10 experiences
    assert mt.multi_task and len(mt) == 10 and mt.task_heads().shape == (10, 100)
    assert make_scenario(**{"name": "split_cifar100", **s.describe()["kwargs"], "root": tmp_path}).class_order \
        == s.class_order


def test_split_cifar100_found_through_the_environment_and_missing_files_message(tmp_path, monkeypatch):
    _fake_cifar100(tmp_path / "cifar100")
    monkeypatch.setenv("EXML_FAST_DATA", str(tmp_path))
    assert sc.split_cifar100(5).dataset == "cifar100"
    monkeypatch.setenv("EXML_FAST_DATA", str(tmp_path / "env"))
    os.unlink(tmp_path / "cifar100" / "test")
    with pytest.raises(FileNotFoundError) as info:
        sc.split_cifar100(root=tmp_path / "cifar100")
    for needle in ["train, test", "cifar-100-python.tar.gz", "EXML_FAST_DATA", "cifar100/cifar-100-python",
                   str(tmp_path / "cifar100")]:
        assert needle in str(info.value)


def test_cifar100_labels_out_of_range_are_refused(tmp_path):
    _fake_cifar100(tmp_path)
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"fine_labels": [0, 100]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test: 'fine_labels' must hold 2 classes in 0..99"):
        sc.split_cifar100(root=tmp_path)


# ------------------------------------------------------------------------------------------- base classes


def test_base_classes_first_task_then_the_rest_split_evenly(tmp_path):
    _fake_cifar100(tmp_path)
    s = sc.split_cifar100(6, base_classes=50, seed=1, root=tmp_path)
    order = sc.class_order(100, 1)
    assert [len(e.classes) for e in s] == [50, 10, 10, 10, 10, 10]
    assert s[0].classes == tuple(sorted(order[:50])) and s[1].classes == tuple(sorted(order[50:60]))
    assert s.describe()["kwargs"]["base_classes"] == 50
    odd = sc.split_cifar100(4, base_classes=10, root=tmp_path)  # 90 left over 3 tasks
    assert [len(e.classes) for e in odd] == [10, 30, 30, 30]
    uneven = sc.split_cifar100(3, base_classes=60, root=tmp_path)  # 40 over 2
    assert [len(e.classes) for e in uneven] == [60, 20, 20]
    for kw, match in [({"n_experiences": 1, "base_classes": 50}, "n_experiences >= 2"),
                      ({"n_experiences": 6, "base_classes": 96}, r"base_classes must be an int in \[1, 95\]"),
                      ({"n_experiences": 6, "base_classes": 0}, "base_classes")]:
        with pytest.raises(ValueError, match=match):
            sc.split_cifar100(root=tmp_path, **kw)


# ----------------------------------------------------------------------------------------- train_experts


def _toy_scenario(*, multi_task=False, n_experiences=2, per_class=12, num_classes=4) -> Scenario:
    """A learnable toy stream: class c lights up the c-th 8-row band of a 32x32 image."""
    g = torch.Generator().manual_seed(0)

    def data(n):
        y = torch.arange(num_classes).repeat_interleave(n)
        x = 0.3 * torch.randn(y.shape[0], 1, 32, 32, generator=g)
        for c in range(num_classes):
            x[y == c, :, 8 * c:8 * c + 8, :] += 1.5
        return x, y

    (tx, ty), (vx, vy) = data(per_class), data(4)
    blocks = sc._partition(tuple(range(num_classes)), n_experiences)
    exps = []
    for i, classes in enumerate(blocks):
        m, k = torch.isin(ty, torch.tensor(classes)), torch.isin(vy, torch.tensor(classes))
        exps.append(Experience(index=i, classes=classes, task_id=i if multi_task else None,
                               train_x=tx[m], train_y=ty[m], test_x=vx[k], test_y=vy[k]))
    return Scenario(name="toy_mt" if multi_task else "toy", dataset="toy", num_classes=num_classes,
                    input_shape=(1, 32, 32), mean=(0.0,), std=(1.0,), multi_task=multi_task, seed=0,
                    class_order=tuple(range(num_classes)), experiences=exps)


# The GPU machine has no safetensors: tests there store torch-format weights.
try:
    import safetensors.torch  # noqa: F401
    FMT = "safetensors"
except ImportError:
    FMT = "torch"
TRAIN = dict(arch="lenet5", epochs=2, batch_size=8, lr=0.05, progress=False, weights_format=FMT)


def test_train_experts_writes_a_stream(tmp_path):
    s = _toy_scenario()
    stream = train_experts(s, tmp_path / "run", **TRAIN)
    assert isinstance(stream, ExpertStream) and len(stream) == 2
    reopened = ExpertStream(tmp_path / "run")
    assert reopened.meta["scenario"] == s.describe() and reopened.meta["arch"] == "lenet5"
    assert reopened.meta["arch_kwargs"] == {"num_classes": 4, "in_channels": 1}
    assert reopened.meta["training"]["epochs"] == 2 and reopened.meta["training"]["lr"] == 0.05
    for i, e in enumerate(reopened):
        assert e.classes == s[i].classes and e.task_id is None and e.num_classes == 4
        assert e.input_shape == (1, 32, 32) and e.mean == (0.0,) and e.std == (1.0,)
        assert e.meta["experience"] == i and e.meta["dataset"] == "toy" and e.meta["train_size"] == 24
        assert e.meta["test_accuracy"] >= 0.75 and e.meta["test_accuracy_head"] >= e.meta["test_accuracy"]
        assert e.model(s[i].test_x).shape == (8, 4)


def test_shared_initialisation(tmp_path):
    # lr tiny and no weight decay: each expert is (to float precision) the shared initialisation.
    stream = train_experts(_toy_scenario(), tmp_path / "run", **{**TRAIN, "lr": 1e-30, "weight_decay": 0.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = build_model("lenet5", num_classes=4, in_channels=1).state_dict()
    for expert in stream:
        for k, v in expert.model.state_dict().items():
            assert torch.allclose(v, init[k], atol=1e-12), k


def test_train_experts_is_deterministic(tmp_path):
    a = train_experts(_toy_scenario(), tmp_path / "a", **TRAIN, seed=3)
    b = train_experts(_toy_scenario(), tmp_path / "b", **TRAIN, seed=3)
    c = train_experts(_toy_scenario(), tmp_path / "c", **TRAIN, seed=4)
    assert [e["sha256"] for e in a.entries] == [e["sha256"] for e in b.entries]
    assert a.entries[0]["sha256"] != a.entries[1]["sha256"]
    assert [e["sha256"] for e in a.entries] != [e["sha256"] for e in c.entries]


def test_resume_skips_trained_experts(tmp_path, monkeypatch):
    s = _toy_scenario()
    full = train_experts(s, tmp_path / "run", **TRAIN)
    calls = []
    real = sc.train_expert  # exml_fast.training.experts.train_expert, one call per expert
    monkeypatch.setattr(sc, "train_expert", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert len(train_experts(s, tmp_path / "run", **TRAIN)) == 2 and calls == []
    # Interrupted after the first expert: stream.json lists one.
    spath = tmp_path / "run" / "stream.json"
    obj = json.loads(spath.read_text())
    obj["experts"] = obj["experts"][:1]
    spath.write_text(json.dumps(obj))
    resumed = train_experts(s, tmp_path / "run", **TRAIN)
    assert calls == [1] and resumed.entries == full.entries  # bit-identical to the uninterrupted run


def test_config_mismatch_names_the_keys(tmp_path):
    train_experts(_toy_scenario(), tmp_path / "run", **TRAIN)
    with pytest.raises(ValueError, match=r"stream\.json.*differing keys.*training\.lr: 0\.05 vs 0\.1"):
        train_experts(_toy_scenario(), tmp_path / "run", **{**TRAIN, "lr": 0.1})
    with pytest.raises(ValueError, match=r"arch: 'lenet5' vs 'lenet5_bn'"):
        train_experts(_toy_scenario(), tmp_path / "run", **{**TRAIN, "arch": "lenet5_bn"})
    with pytest.raises(ValueError, match=r"scenario\.experiences"):
        train_experts(_toy_scenario(per_class=5), tmp_path / "run", **TRAIN)


def test_multi_task_experts_train_their_head_only(tmp_path):
    s = _toy_scenario(multi_task=True)
    stream = train_experts(s, tmp_path / "mt", **{**TRAIN, "weight_decay": 0.0})
    nc = train_experts(_toy_scenario(), tmp_path / "nc", **{**TRAIN, "weight_decay": 0.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = build_model("lenet5", num_classes=4, in_channels=1).classifier.weight
    for i, (mt_e, nc_e) in enumerate(zip(stream, nc)):
        head = list(s[i].classes)
        other = [c for c in range(4) if c not in head]
        w = mt_e.model.classifier.weight
        assert mt_e.task_id == i and mt_e.meta["multi_task"] is True
        assert torch.equal(w[other], init[other]) and not torch.equal(w[head], init[head])
        assert not torch.equal(nc_e.model.classifier.weight[other], init[other])
        assert mt_e.meta["test_accuracy_head"] >= 0.75


def test_default_epochs_and_argument_errors(tmp_path):
    joint = _toy_scenario(n_experiences=1, per_class=2)
    joint_stream = train_experts(joint, tmp_path / "j", arch="lenet5", progress=False, weights_format=FMT)
    assert joint_stream[0].meta["training"]["epochs"] == 100
    split = _toy_scenario(n_experiences=2, per_class=2)
    split_stream = train_experts(split, tmp_path / "s", progress=False, weights_format=FMT)
    assert ExpertStream(split_stream.path).meta["training"]["epochs"] == 20
    with pytest.raises(ValueError, match=r"arch_kwargs\['num_classes'\] = 10 does not match the scenario's 4"):
        train_experts(split, tmp_path / "x", arch_kwargs={"num_classes": 10})
    with pytest.raises(ValueError, match="arch must be one of"):
        train_experts(split, tmp_path / "x", arch="vgg")
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        train_experts(split, tmp_path / "x", epochs=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        train_experts(split, tmp_path / "x", lr=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_train_experts_on_cuda(tmp_path):
    s = _toy_scenario(multi_task=True)
    stream = train_experts(s, tmp_path / "gpu", **{**TRAIN, "weights_format": "torch"}, device="cuda")
    for e in stream:
        assert next(e.model.parameters()).device.type == "cpu" and e.meta["device"].startswith("cuda")
        assert e.meta["test_accuracy_head"] >= 0.75


@needs_mnist
def test_split_mnist_base_classes_and_the_mt_default():
    s = split_mnist(3, base_classes=6, seed=2, max_train_per_experience=5, max_test_per_experience=5)
    assert [len(e.classes) for e in s] == [6, 2, 2] and s.options["base_classes"] == 6
    assert len(SCENARIOS["split_mnist_mt"](max_train_per_experience=1, max_test_per_experience=1)) == 5
