"""The defaults ``exml-fast run`` / ``build_strategy`` give each strategy, by budget and by dataset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from exml_fast.cli_exml import DEMO_BUDGET, RUN_OPTIONS, build_strategy
from exml_fast.reproduce import BUDGETS


def _stream(arch: str = "lenet5", in_channels: int = 1):
    """What build_strategy reads of an expert stream: the experts' architecture."""
    return SimpleNamespace(meta={"arch": arch, "arch_kwargs": {"num_classes": 10, "in_channels": in_channels}},
                           entries=[{"arch": arch}])


def _mnist_scenario():
    return SimpleNamespace(dataset="mnist", name="split_mnist", input_shape=(1, 32, 32), mean=(0.1307,),
                           std=(0.3081,))


def _build(name: str, options: dict, scenario=None, stream=None):
    return build_strategy(name, stream or _stream(), scenario or _mnist_scenario(), options=options, seed=0,
                          device="cpu", progress=False)


def test_distillation_sgd_has_no_momentum_in_the_paper_budget_and_by_default():
    assert BUDGETS["paper"]["run"]["momentum"] == 0.0
    assert RUN_OPTIONS["momentum"][1] == 0.0
    assert _build("mi-ed", BUDGETS["paper"]["run"]).momentum == 0.0
    assert _build("mi-ed", {}).momentum == 0.0
    # The option stays, and the budgets whose records ran with 0.9 pin it.
    assert _build("mi-ed", {"momentum": 0.9}).momentum == 0.9
    assert BUDGETS["demo"]["run"]["momentum"] == 0.9 and DEMO_BUDGET["momentum"] == 0.9


def test_mi_and_di_match_bn_statistics_in_the_exml_papers_form():
    from exml_fast.ablation import ABLATION_BASE, PRESETS
    from exml_fast.models import LeNet5BN
    from exml_fast.synth import DataImpressions, DeepInversion, ModelInversion

    teacher = LeNet5BN(num_classes=10, in_channels=1).eval()
    kw = dict(input_shape=(1, 32, 32), num_classes=10)
    assert ModelInversion(teacher, **kw).bn_form == "sq_std"
    assert DataImpressions(teacher, **kw).bn_form == "sq_std"
    assert DeepInversion(teacher, **kw).bn_form == "l2"  # DeepInversion keeps its own form
    assert ModelInversion(teacher, bn_form="l2", **kw).bn_form == "l2"
    assert BUDGETS["paper"]["run"]["bn_form"] == "sq_std" and RUN_OPTIONS["bn_form"][1] == "sq_std"
    for name in ("mi-ed", "di-ed"):
        assert _build(name, BUDGETS["paper"]["run"]).generator.options["bn_form"] == "sq_std"
    # What ran with DeepInversion's form before the default changed keeps it.
    assert BUDGETS["demo"]["run"]["bn_form"] == DEMO_BUDGET["bn_form"] == ABLATION_BASE["bn_form"] == "l2"
    assert PRESETS["ed-best"]["options"]["bn_form"] == "l2"
