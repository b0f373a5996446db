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
        "note": "the best Split MNIST variant of benches/results/exml_mnist_ablation.md (mi-bn-no-augment): "
                "model inversion of BatchNorm experts matching their BN statistics (weight 1), distillation "
                "minibatches not augmented, 300 synthesis steps (a tenth of the paper's) at Adam lr 0.05, "
                "distillation SGD with momentum 0.9 and DeepInversion's BN form (as the ablation's rows ran)",
    },
}
