"""Progress of long work: a tqdm bar, or a plain line every few seconds when tqdm is missing."""

from __future__ import annotations

import math
import sys
import time

import torch

__all__ = ["Progress", "RunningLoss"]


class Progress:
    """A tqdm bar (plain lines when tqdm is missing or progress is off-terminal and disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self._last_print = 0.0
        self.total = total
        self.done = 0
        self.desc = desc
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # optional at run time: fall back to a line every few seconds
            return
        self.bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, leave=True)

    def update(self, k: int, postfix: dict[str, float] | None = None, desc: str | None = None) -> None:
        self.done += k
        if not self.enabled:
            return
        text = "" if postfix is None else ", ".join(f"{key}={v:.4g}" for key, v in postfix.items())
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description(desc, refresh=False)
            if postfix is not None:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(k)
            return
        now = time.monotonic()
        if now - self._last_print >= 5.0 or self.done >= self.total:
            self._last_print = now
            print(f"{desc or self.desc}: {self.done}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunningLoss:
    """The mean loss of a training loop's last steps, shown on ``bar``: the losses add up on their device and
    are read (one host sync) every ``every`` steps — ``min(100, total // 20)``, at least 1 — and at
    :meth:`flush`. :attr:`last` is the mean of the last group read (nan before any). ``reduce``, if given,
    maps the group's sum before it is read (the sum over the ranks of a sharded loop: every rank must
    then add and flush at the same steps)."""

    def __init__(self, bar: Progress, total: int, device: torch.device, reduce=None) -> None:
        self.bar = bar
        self.reduce = reduce
        self.every = max(1, min(100, total // 20))
        self.sum = torch.zeros((), device=device)
        self.count = 0
        self.last = math.nan

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach()
        self.count += 1
        if self.count == self.every:
            self.flush()

    def flush(self) -> float:
        """Reads the steps added since the last read, if any, onto the bar; returns :attr:`last`."""
        if self.count:
            self.last = float(self.sum if self.reduce is None else self.reduce(self.sum)) / self.count
            self.bar.update(self.count, {"loss": self.last})
            self.sum.zero_()
            self.count = 0
        return self.last
