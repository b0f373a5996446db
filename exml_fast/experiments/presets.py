"""Named presets of ``exml-fast run --preset``: a strategy and run options chosen by an experiment (the
ablation, :mod:`exml_fast.experiments.ablation`, selects them on validation data)."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

#: Named presets of ``exml-fast run --preset``: strategy, run options, and the expert architecture they
#: were chosen with (a preset runs on any experts; the BN terms need experts with BatchNorm).
PRESETS: dict[str, dict[str, Any]] = {
    "ed-best": {
        "strategy": "mi-ed",
        "arch": "lenet5_bn",
        "options": {"bn_weight": 1.0, "augment": False, "synth_iterations": 300, "synth_lr": 0.05, "momentum": 0.9,
                    "bn_form": "l2"},
        "note": "the Split MNIST variant of benches/results/exml_mnist_ablation.md selected on validation data "
                "(mi-bn-no-augment: 72.5 % on 10000 held-out training images over 3 streams; 77.3 ± 5.4 % on the "
                "test set over 5 fresh streams): model inversion of BatchNorm experts matching their BN statistics "
                "(weight 1, DeepInversion's form), distillation minibatches not augmented, 300 synthesis steps (a "
                "tenth of the paper's) at Adam lr 0.05, distillation SGD with momentum 0.9 (as the ablation's rows "
                "ran)",
    },
}
