"""Training one expert: a classifier trained on one experience's data, either over all its outputs
(class-incremental) or over the output units of its classes only (a multi-task head), with the ExML paper's
Appendix A recipe by default (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 32).

:func:`exml_fast.cl.scenarios.train_experts` trains a whole stream with these, one expert per experience.

Example::

    model = init_expert_model("lenet5", {"num_classes": 10, "in_channels": 1}, seed=0)
    train_expert(model, x, y, units=(3, 7), num_classes=10, epochs=20, generator=torch.Generator().manual_seed(1))
    acc = expert_accuracy(model, x_test, y_test, units=(3, 7), num_classes=10)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from exml_fast._utils.batches import minibatch_bounds
from exml_fast._utils.progress import Progress
from exml_fast.models import build_model
from exml_fast.training.core import evaluate, train_classifier

__all__ = ["HeadView", "check_sgd_settings", "default_expert_epochs", "expert_accuracy", "head_labels",
           "init_expert_model", "train_expert"]


class HeadView(nn.Module):
    """The logits of a subset of output units, (B, K) -> (B, len(units)): a multi-task head for training."""

    def __init__(self, model: nn.Module, units: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("units", torch.tensor(units, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.units)


def head_labels(y: torch.Tensor, units: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """Global class indices ``y`` (N,) as positions in ``units`` (-1 for a class outside them)."""
    lut = torch.full((num_classes,), -1, dtype=torch.int64)
    lut[list(units)] = torch.arange(len(units))
    return lut[y]


def expert_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, units: tuple[int, ...] | None,
                    num_classes: int) -> float:
    """Top-1 accuracy in [0, 1], argmax over all outputs (units None) or over ``units`` only; nan for no samples."""
    if x.shape[0] == 0:
        return float("nan")
    if units is None:
        return evaluate(model, x, y)
    head = HeadView(model, units).to(next(model.parameters()).device)
    return evaluate(head, x, head_labels(y, units, num_classes))


def default_expert_epochs(scenario) -> int:
    """Epochs of the ExML paper's experts (Appendix A) for a scenario (anything with ``dataset`` and a length,
    e.g. :class:`~exml_fast.cl.scenarios.Scenario`): CIFAR-10 100 (joint, split and multi-task), MNIST 100
    for the joint scenario and 20 for the split ones. CIFAR-100, which the paper does not use, takes
    CIFAR-10's 100."""
    return 100 if scenario.dataset in ("cifar10", "cifar100") or len(scenario) == 1 else 20


def check_sgd_settings(*, lr: float, momentum: float, weight_decay: float, owner: str) -> None:
    """ValueError naming the argument unless ``lr`` > 0 and ``momentum``, ``weight_decay`` >= 0 are finite numbers."""
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                or (name == "lr" and value == 0):
            raise ValueError(f"{owner}: {name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}; "
                             f"got {value!r}")


def init_expert_model(arch: str, arch_kwargs: dict[str, Any], seed: int) -> nn.Module:
    """``build_model(arch, **arch_kwargs)`` initialised under ``torch.manual_seed(seed)``, without touching the
    caller's global generator: the shared initialisation every expert of a stream starts from."""
    with torch.random.fork_rng(devices=[]):  # the initialisation draws from the global generator
        torch.manual_seed(seed)
        return build_model(arch, **arch_kwargs)


def train_expert(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, units: tuple[int, ...] | None,
                 num_classes: int, epochs: int, batch_size: int = 32, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4, generator: torch.Generator | None = None, progress: bool = False,
                 desc: str = "expert") -> nn.Module:
    """Trains ``model`` (in place, on its device) with SGD and cross-entropy on images ``x`` (N, C, H, W) and
    global class indices ``y`` (N,): over all outputs (``units`` None) or over the output units ``units``
    only (a multi-task head; ``y`` must hold only those classes). Minibatch order comes from ``generator``
    (:func:`~exml_fast.training.train_classifier`). ``progress``: a bar titled ``desc`` showing the mean loss
    (one device sync per 50 steps). Returns ``model`` in eval mode."""
    device = next(model.parameters()).device
    net = model if units is None else HeadView(model, units).to(device)
    labels = y if units is None else head_labels(y, units, num_classes)
    bar = Progress(epochs * len(minibatch_bounds(x.shape[0], batch_size)), desc, progress)
    losses: list[torch.Tensor] = []

    def on_step(epoch: int, step: int, loss: torch.Tensor) -> None:
        losses.append(loss)
        if len(losses) == 50:  # one device sync per 50 steps for the postfix
            bar.update(50, {"loss": torch.stack(losses).mean().item(), "epoch": epoch + 1})
            losses.clear()

    try:
        train_classifier(net, x, labels, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, generator=generator, callback=on_step if progress else None)
        if losses:
            bar.update(len(losses), {"loss": torch.stack(losses).mean().item()})
    finally:
        bar.close()
    return model.eval()
