"""The defaults ``exml-fast run`` / ``build_strategy`` give each strategy, by budget and by dataset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from exml_fast.cl.strategies import RUN_OPTIONS, build_strategy
from exml_fast.data import find_data_root
from exml_fast.experiments.budgets import BUDGETS

DEMO_BUDGET = BUDGETS["demo"]["run"]  # exml-fast demo runs the demo budget


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
    from exml_fast.experiments.ablation import ABLATION_BASE, PRESETS
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
        assert _build(name, BUDGETS["paper"]["run"]).source.options["bn_form"] == "sq_std"
    # What ran with DeepInversion's form before the default changed keeps it.
    assert BUDGETS["demo"]["run"]["bn_form"] == DEMO_BUDGET["bn_form"] == ABLATION_BASE["bn_form"] == "l2"
    assert PRESETS["ed-best"]["options"]["bn_form"] == "l2"


def test_cifar10_runs_get_the_papers_cifar_settings(tmp_path):
    from _util import fake_cifar10

    from exml_fast.cl.scenarios import default_expert_epochs, split_cifar10
    from exml_fast.cl.strategies import DATASET_RUN_DEFAULTS

    fake_cifar10(tmp_path / "cifar-10-batches-py")
    scenario = split_cifar10(5, seed=0, root=tmp_path)
    stream = _stream(in_channels=3)
    mi = _build("mi-ed", {}, scenario, stream)
    # Appendix B.2: distillation lr 0.1, 50000 steps of 32; MI 500 Adam steps at lr 0.1 on batches of 1024,
    # BNS 0, blur 0.01, weight decay 1e-4, τ 2; flips in the distillation augmentation.
    assert (mi.lr, mi.iterations, mi.batch_size, mi.flip) == (0.1, 50000, 32, True)
    o = mi.source.options
    assert (o["iterations"], o["lr"], o["batch_size"], o["bn_weight"]) == (500, 0.1, 1024, 0.0)
    assert (o["blur_weight"], o["l2_sq_weight"], o["temperature"]) == (0.01, 1e-4, 2.0)
    assert _build("di-ed", {}, scenario, stream).source.options["temperature"] == 2.0  # DI: τ 2, not 20
    # Options given win over the dataset's defaults.
    given = _build("mi-ed", {"lr": 0.05, "flip": False, "synth_iterations": 7}, scenario, stream)
    assert given.lr == 0.05 and not given.flip and given.source.options["iterations"] == 7
    assert set(DATASET_RUN_DEFAULTS["cifar10"]) <= set(RUN_OPTIONS)
    # No auxiliary dataset of the paper's (ImageNet) here: aux-ed on CIFAR needs one named.
    with pytest.raises(ValueError, match="ImageNet.*--aux-dataset"):
        _build("aux-ed", {}, scenario, stream)
    # MNIST keeps the MNIST settings.
    mnist = _build("mi-ed", {})
    assert (mnist.lr, mnist.iterations, mnist.flip, mnist.source.options["iterations"]) == (0.01, 30000, False,
                                                                                               3000)
    # Experts: 100 epochs for CIFAR-10 (Appendix A.2); Split MNIST's 20: the next test.
    assert default_expert_epochs(scenario) == 100


@pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")
def test_split_mnist_experts_train_20_epochs():
    from exml_fast.cl.scenarios import default_expert_epochs, split_mnist

    assert default_expert_epochs(split_mnist(5, seed=0, max_train_per_experience=10,
                                             max_test_per_experience=10)) == 20
