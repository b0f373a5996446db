"""Exemplar memories and iCaRL's pieces (Rebuffi et al.; REFERENCE.md §4): penultimate features, herding
selection, the class-balanced memory of K exemplars and the nearest-mean-of-exemplars (NME) classifier.

- :func:`penultimate_features`: the input of a classifier's last ``nn.Linear`` (the common layout of every
  model in :mod:`exml_fast.models`), L2-normalised as iCaRL uses it.
- :func:`herding`: the greedy order in which each next sample brings the mean of the chosen set closest to
  the class mean; one matrix-vector product per chosen sample (no Python loop over candidates). A prefix of the
  order is the herding choice for a smaller budget, so shrinking a class's exemplars keeps their first m.
- :class:`ExemplarMemory`: at most K exemplars, ``K // classes`` per class, each class in herding order.
- :func:`nearest_mean_logits`: NME as one batched distance computation: ``-||f(x) - mu_c||²`` per class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_int
from exml_fast.models.features import classifier_layer
from exml_fast.ops.fast_layers import fast_layers

__all__ = ["ExemplarMemory", "class_means", "classifier_layer", "herding", "nearest_mean_logits",
           "penultimate_features"]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500,
                         normalize: bool = True) -> torch.Tensor:
    """(N, D) float32 features of ``x`` (N, C, H, W): the input of ``model``'s last ``nn.Linear``, computed in
    eval mode on the model's device in minibatches (its stride = kernel pooling layers on the fused
    :func:`~exml_fast.ops.window_pool`), L2-normalised per row when ``normalize``; on ``x``'s device."""
    head = classifier_layer(model)
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else x.device
    grabbed: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].flatten(1).float()))
    was_training = model.training
    model.eval()
    try:
        parts = []
        with fast_layers(model):  # LeNet's pooling (max_pool2d was 15 % of an iCaRL task here) and tanh
            for start in range(0, x.shape[0], batch_size):
                grabbed.clear()
                model(x[start:start + batch_size].to(dev))
                parts.append(grabbed[-1])
    finally:
        hook.remove()
        model.train(was_training)
    f = torch.cat(parts) if parts else torch.empty(0, head.in_features, device=dev)
    if normalize:
        f = torch.nn.functional.normalize(f, dim=1)
    return f.to(x.device)


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """The first ``m`` indices of iCaRL's herding order over ``features`` (N, D): step k picks, among the
    samples not chosen yet, the one that makes the mean of the k chosen closest (L2) to the mean of all N.

    Each step is one matrix-vector product over every candidate (the distances expanded, their constant
    dropped); ties go to the lowest index.
    Returns int64 (min(m, N),), on ``features``' device.
    """
    if features.dim() != 2:
        raise ValueError(f"herding: features must be (N, D); got {tuple(features.shape)}")
    check_int(m, "m", "herding", low=0)
    n = features.shape[0]
    m = min(m, n)
    f = features.double()  # the running sums over hundreds of steps stay exact enough to keep the order
    mu = f.mean(0)
    sq = (f * f).sum(1)
    chosen = torch.empty(m, dtype=torch.int64, device=f.device)
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    running = torch.zeros_like(mu)
    for k in range(1, m + 1):
        # || mu - (running + f_i) / k ||² = || c ||² - (2 / k) c · f_i + || f_i ||² / k², c = mu - running / k:
        # one matrix-vector product per step (the constant || c ||² dropped)
        c = mu - running / k
        score = (sq / (k * k) - (2.0 / k) * (f @ c)).masked_fill_(taken, float("inf"))
        i = int(torch.argmin(score))
        chosen[k - 1] = i
        taken[i] = True
        running += f[i]
    return chosen


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: list[int] | torch.Tensor) -> torch.Tensor:
    """(C, D): the mean feature of each class of ``classes`` over its rows, L2-normalised (iCaRL's prototype)."""
    rows = []
    for c in (classes.tolist() if isinstance(classes, torch.Tensor) else classes):
        sel = features[labels == int(c)]
        if sel.shape[0] == 0:
            raise ValueError(f"class_means: no sample of class {int(c)}")
        rows.append(sel.mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def nearest_mean_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(B, C) scores ``-||f_b - mu_c||²`` of ``features`` (B, D) against class ``means`` (C, D): the argmax is
    the nearest mean. One matrix product (``||f||² - 2 f·mu + ||mu||²``), no loop over classes."""
    if features.dim() != 2 or means.dim() != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(f"nearest_mean_logits: features (B, D) and means (C, D) must share D; got "
                         f"{tuple(features.shape)} and {tuple(means.shape)}")
    d = (features.pow(2).sum(1, keepdim=True) - 2 * features @ means.T + means.pow(2).sum(1)).clamp_min_(0)
    return -d


class ExemplarMemory:
    """At most ``capacity`` real exemplars, split evenly over the classes stored: ``capacity // classes`` per
    class, each class in herding order (so shrinking keeps a prefix). Tensors live on the CPU.

    Args:
        capacity: K, the total number of exemplars (iCaRL: 2000).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = check_int(capacity, "capacity", "ExemplarMemory", low=1)
        self._x: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return sum(int(v.shape[0]) for v in self._x.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self._x)

    def per_class(self, num_classes: int) -> int:
        """m = K // num_classes, the exemplars each class may keep when ``num_classes`` classes share K."""
        return self.capacity // max(1, num_classes)

    def reduce(self, m: int) -> None:
        """Keeps the first ``m`` exemplars of every class (a herding prefix)."""
        for c in list(self._x):
            self._x[c] = self._x[c][:m].clone()

    def add(self, c: int, x: torch.Tensor) -> None:
        """Stores ``x`` (n, C, H, W) as class ``c``'s exemplars (in the order given)."""
        if int(c) in self._x:
            raise ValueError(f"ExemplarMemory.add: class {int(c)} is stored already")
        self._x[int(c)] = x.detach().to("cpu", torch.float32).contiguous().clone()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of every exemplar, classes in increasing order (empty tensors when nothing is stored)."""
        if not self._x:
            return torch.empty(0), torch.empty(0, dtype=torch.int64)
        xs = [self._x[c] for c in self.classes]
        ys = [torch.full((v.shape[0],), c, dtype=torch.int64) for c, v in zip(self.classes, xs)]
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "x": {c: v for c, v in self._x.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"ExemplarMemory.load_state_dict: capacity {state['capacity']} in the state, "
                             f"{self.capacity} here")
        self._x = {int(c): v for c, v in state["x"].items()}
