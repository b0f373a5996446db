"""The ExML paper's ensemble baselines (§5): they keep every expert, so they only bound the ExML strategies."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from exml_fast.cl.strategies.base import Strategy, frozen_copy
from exml_fast.cl.strategies.registry import BuildContext, register_strategy

__all__ = ["EnsembleAverage", "MinEntropyEnsemble", "OracleEnsemble"]


class _ExpertEnsemble(Strategy):
    """Keeps every expert's model (frozen, on the strategy's device): not an ex-model strategy."""

    ex_model = False

    def __init__(self, *, device: torch.device | str | None = None, seed: int = 0, progress: bool = True) -> None:
        super().__init__(device=device, seed=seed, progress=progress)
        self.experts: list[nn.Module] = []
        self._specs: list[dict[str, Any]] = []

    def train(self, expert) -> None:
        self._check_expert(expert)
        for key in ("arch", "arch_kwargs"):
            if not hasattr(expert, key):
                raise TypeError(f"{type(self).__name__}.train: expert must be an exml_fast.Expert (with {key})")
        self.experts.append(frozen_copy(expert.model).to(self._device()))
        self._specs.append({"arch": expert.arch, "arch_kwargs": dict(expert.arch_kwargs)})
        self._record(expert)

    def _all_logits(self, x) -> torch.Tensor:
        """(E, B, K) float logits of every expert."""
        return torch.stack([m(x).float() for m in self.experts])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "experts": [
            {**spec, "state_dict": m.state_dict()} for spec, m in zip(self._specs, self.experts)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from exml_fast.models import build_model

        super().load_state_dict(state)
        self.experts, self._specs = [], []
        for e in state["experts"]:
            m = build_model(e["arch"], **e["arch_kwargs"])
            m.load_state_dict(e["state_dict"])
            self.experts.append(frozen_copy(m).to(self._device()))
            self._specs.append({"arch": e["arch"], "arch_kwargs": e["arch_kwargs"]})


class OracleEnsemble(_ExpertEnsemble):
    """The paper's Oracle: the task label of a sample (its experience) picks the expert.

    The answer is the expert's logits on its own classes and ``-inf``
    elsewhere. ``predict`` needs ``task_ids``: the task label in multi-task
    streams, else the index of the experience the sample comes from.
    """

    name = "oracle"
    needs_task_labels = True

    def logits(self, x, task_ids):
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), device=x.device)
        keys = self.experience_tasks if self.multi_task else list(range(self.experiences_seen))
        known = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for key, model, cls in zip(keys, self.experts, self.experience_classes):
            rows = (task_ids == key).nonzero().flatten()
            if rows.numel():
                known[rows] = True
                cols = torch.tensor(cls, device=x.device)
                out[rows[:, None], cols[None, :]] = model(x[rows]).float()[:, cols]
        if not bool(known.all()):
            raise ValueError(f"OracleEnsemble.predict: some task_ids name no expert seen (known: {keys})")
        return out


class EnsembleAverage(_ExpertEnsemble):
    """The mean of the experts' softmax outputs (returned as log-probabilities)."""

    name = "ensemble-avg"

    def logits(self, x, task_ids):
        return torch.logsumexp(torch.log_softmax(self._all_logits(x), -1), 0) - math.log(len(self.experts))


class MinEntropyEnsemble(_ExpertEnsemble):
    """Per sample, the expert whose softmax has the lowest entropy answers (its logits)."""

    name = "min-entropy"

    def logits(self, x, task_ids):
        logits = self._all_logits(x)                       # (E, B, K)
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)             # (E, B)
        best = entropy.argmin(0)                           # (B,)
        return logits[best, torch.arange(x.shape[0], device=x.device)]


def _register(cls: type[_ExpertEnsemble], help: str) -> None:
    @register_strategy(cls.name, keeps_data=False, help=help)
    def build(ctx: BuildContext, opt: dict[str, Any]) -> _ExpertEnsemble:
        return cls(device=ctx.device, seed=ctx.seed, progress=ctx.progress)


_register(OracleEnsemble, "the expert of each sample's task answers (needs task labels; keeps every expert)")
_register(EnsembleAverage, "the mean of every expert's softmax (keeps every expert)")
_register(MinEntropyEnsemble, "per sample, the expert with the most confident answer (keeps every expert)")
