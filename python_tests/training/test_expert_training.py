"""exml_fast.training.experts: one expert's training over all outputs or a multi-task head, its accuracies, the
shared initialisation and the recipe's checks. (Whole streams: python_tests/cl/test_scenarios.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from exml_fast.training.experts import (HeadView, check_sgd_settings, default_expert_epochs, expert_accuracy,
                                        head_labels, init_expert_model, train_expert)


def _bands(n: int = 24, classes=(1, 3), seed: int = 0):
    """Images whose class is the row band that is bright: separable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.arange(n) % len(classes)]
    x = 0.1 * torch.randn(n, 1, 32, 32, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 8 * c : 8 * c + 8] += 2.0
    return x, y


def test_head_labels_and_view():
    y = torch.tensor([3, 1, 3, 0])
    assert head_labels(y, (1, 3), 4).tolist() == [1, 0, 1, -1]
    model = nn.Linear(2, 4)
    out = HeadView(model, (3, 1))(torch.ones(5, 2))
    assert torch.equal(out, model(torch.ones(5, 2))[:, [3, 1]])


def test_train_expert_on_a_head_moves_only_those_units():
    x, y = _bands()
    model = init_expert_model("lenet5", {"num_classes": 4, "in_channels": 1}, seed=0)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    before = last.weight.detach().clone()
    out = train_expert(model, x, y, units=(1, 3), num_classes=4, epochs=3, batch_size=8, lr=0.05,
                       weight_decay=0.0, generator=torch.Generator().manual_seed(1))
    assert out is model and not model.training
    moved = (last.weight.detach() - before).abs().sum(1)
    assert moved[[0, 2]].eq(0).all() and moved[[1, 3]].gt(0).all()  # units outside the head get no gradient
    assert expert_accuracy(model, x, y, units=(1, 3), num_classes=4) >= expert_accuracy(model, x, y, units=None,
                                                                                          num_classes=4)
    assert expert_accuracy(model, x, y, units=(1, 3), num_classes=4) > 0.9
    assert math.isnan(expert_accuracy(model, x[:0], y[:0], units=None, num_classes=4))


def test_train_expert_is_deterministic_and_shows_progress(capsys):
    x, y = _bands(classes=(0, 1, 2, 3))
    runs = []
    for progress in (False, True):
        model = init_expert_model("lenet5", {"num_classes": 4, "in_channels": 1}, seed=2)
        train_expert(model, x, y, units=None, num_classes=4, epochs=2, batch_size=4, lr=0.05,
                     generator=torch.Generator().manual_seed(5), progress=progress, desc="expert 1/1")
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # the bar changes nothing


def test_init_expert_model_leaves_the_global_generator_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a = init_expert_model("lenet5", {"num_classes": 10, "in_channels": 1}, seed=3)
    assert torch.equal(torch.rand(3), expected)
    b = init_expert_model("lenet5", {"num_classes": 10, "in_channels": 1}, seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_default_epochs_and_sgd_checks():
    joint = type("S", (), {"dataset": "mnist", "__len__": lambda self: 1})()
    split = type("S", (), {"dataset": "mnist", "__len__": lambda self: 5})()
    cifar = type("S", (), {"dataset": "cifar100", "__len__": lambda self: 10})()
    assert [default_expert_epochs(s) for s in (joint, split, cifar)] == [100, 20, 100]
    check_sgd_settings(lr=0.01, momentum=0, weight_decay=0.0, owner="o")
    for kw, match in (({"lr": 0.0}, "o: lr must be a finite number > 0; got 0.0"),
                      ({"momentum": -1.0}, "o: momentum must be a finite number >= 0"),
                      ({"weight_decay": float("nan")}, "o: weight_decay must be a finite number >= 0"),
                      ({"lr": True}, "o: lr must be")):
        with pytest.raises(ValueError, match=match):
            check_sgd_settings(**{"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, **kw}, owner="o")
