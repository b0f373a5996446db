"""Plain supervised training and evaluation of classifiers on in-memory tensors.

Used to train experts (teachers) for the demo, the command line and the
tests; data-free learning itself lives in :mod:`exml_fast.synth` and the
ExML engine.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate", "train_classifier"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on images ``x`` (N, ...) with labels ``y`` (N,).

    Batches are moved to the model's device; returns a float in [0, 1] (0 for N = 0).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"evaluate: x and y must have the same length; got {x.shape[0]} and {y.shape[0]}")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / max(1, x.shape[0])


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    generator: torch.Generator | None = None,
    log_every: int = 0,
) -> nn.Module:
    """Trains ``model`` with SGD and cross-entropy on (N, ...) images ``x``, labels ``y`` (N,).

    The Ex-Model CL expert recipe by default (SGD lr 0.01, momentum 0.9,
    weight decay 5e-4). Minibatches are drawn by a permutation from
    ``generator`` each epoch and moved to the model's device. Prints the
    running loss every ``log_every`` steps (0: silent). Returns the model in
    eval mode.
    """
    if epochs < 1:
        raise ValueError(f"train_classifier: epochs must be >= 1; got {epochs}")
    if batch_size < 1:
        raise ValueError(f"train_classifier: batch_size must be >= 1; got {batch_size}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"train_classifier: x and y must have the same, non-zero length; got {x.shape[0]} and {y.shape[0]}"
        )
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        running, seen, t0 = 0.0, 0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log_every:
                running += loss.item()
                seen += 1
                if (step + 1) % log_every == 0 or step + 1 == steps_per_epoch:
                    rate = (step + 1) / (time.perf_counter() - t0)
                    print(
                        f"  epoch {epoch + 1}/{epochs} step {step + 1:4d}/{steps_per_epoch} "
                        f"loss {running / seen:.4f} ({rate:.0f} steps/s)",
                        flush=True,
                    )
                    running, seen = 0.0, 0
    return model.eval()
