"""Training a strategy's learner over the ranks of a ``torch.distributed`` process group.

Under ``torchrun`` (or any initialised default group of K > 1 ranks) every rank holds the whole
strategy — the same seed, so the same buffer, minibatch order and augmentation draws — and each
training step's minibatch of B rows is split into K contiguous shares (:func:`shard_rows`). Rank r
runs its share through the learner wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`,
whose backward averages the gradients over the ranks; every loss here is a mean over its rows, so
scaling rank r's loss by ``K * n_r / B`` (``n_r`` its rows) makes that average the gradient of the
whole minibatch's loss, as one process computes it, up to the order of the floating-point sums.

BatchNorm layers of the learner normalise by the statistics of the whole minibatch, as in one
process: for the duration of the loop each training-mode BatchNorm layer runs :class:`_SyncBatchNorm`,
batch normalisation written with ``torch.distributed.all_reduce`` of per-channel sums (float64): two
reductions forward (the mean, then the centred squares) and one backward. (torch's
:class:`~torch.nn.SyncBatchNorm` is the same idea, but its kernels are CUDA-only, and it would count
the stand-in row of a rank with an empty share, see :meth:`ShardedSteps.rows`.) Synthesis for the
buffer is sharded by the synthesizers themselves
(:meth:`~exml_fast.synth.base.Synthesizer.synthesize`'s ``distributed``).
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from exml_fast._utils import dist


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation over the rows of every rank: returns the output and the global
    (mean, biased variance, count) for the running statistics. ``rows_count`` is 1, or 0 for a rank whose
    input is a stand-in (it adds nothing to the sums). Gradients: the input's through the global statistics
    (the sums of ``dy·w`` and ``dy·w·x̂`` over every rank), the weight's and bias's of this rank's rows (DDP
    averages those over the ranks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, rows_count: float):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([rows_count * (x.numel() // x.shape[1])], dtype=torch.float64, device=x.device)
        first = _sum_over_ranks(torch.cat([x.sum(dims, dtype=torch.float64) * rows_count, count]))
        n = first[-1]
        mean = first[:-1] / n
        centred = x - mean.to(x.dtype).view(shape)
        var = _sum_over_ranks(centred.square().sum(dims, dtype=torch.float64) * rows_count) / n
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = centred * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n, ctx.rows_count, ctx.has_bias = n, rows_count, bias is not None
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, _mean, _var, _n):
        xhat, invstd, weight = ctx.saved_tensors
        dims = [0, *range(2, dy.dim())]
        shape = [1, -1] + [1] * (dy.dim() - 2)
        dxhat = dy if weight is None else dy * weight.view(shape)
        c = dy.shape[1]
        local = torch.cat([dxhat.sum(dims, dtype=torch.float64), (dxhat * xhat).sum(dims, dtype=torch.float64)])
        sums = _sum_over_ranks(local * ctx.rows_count) / ctx.n
        m1, m2 = sums[:c].to(dy.dtype).view(shape), sums[c:].to(dy.dtype).view(shape)
        dx = (dxhat - m1 - xhat * m2) * invstd.view(shape)
        if not ctx.rows_count:  # a stand-in row: no gradient through it (the others' sums would give it one)
            dx = torch.zeros_like(dx)
        dw = None if weight is None else (dy * xhat).sum(dims)
        db = dy.sum(dims) if ctx.has_bias else None
        return dx, dw, db, None, None


def _sync_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, *, share: list[float]) -> torch.Tensor:
    """A BatchNorm layer's forward with :class:`_SyncBatchNorm` where it uses batch statistics (``share[0]``:
    the ``rows_count`` of this step); the running statistics are updated as ``_BatchNorm.forward`` does,
    from the global statistics."""
    if not self.training and self.running_mean is not None:  # normalises by the running statistics
        return type(self).forward(self, x)
    self._check_input_dim(x)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    y, mean, var, n = _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps, share[0])
    if self.training and self.track_running_stats:
        with torch.no_grad():
            unbiased = var * (n / max(float(n) - 1.0, 1.0))
            self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
    return y


class ShardedSteps:
    """One training loop's view of the ranks: which rows of each minibatch this rank takes, the learner to
    call (DDP over the ranks, the learner itself in one process), and the mean of a logged loss.

    Args:
        strategy: the strategy whose ``model`` trains; its ``distributed`` attribute (None: shard when a
            group of more than one rank is initialised; False: never; True: the group must exist) decides.
        model: the learner (default: ``strategy.model``).
    """

    def __init__(self, strategy, model: nn.Module | None = None) -> None:
        owner = type(strategy).__name__
        self._patched: list[nn.Module] = []
        self._share = [1.0]  # the BatchNorm rows_count of the current step (0: a stand-in row)
        self.rank, self.world = dist.resolve_world(getattr(strategy, "distributed", None), owner)
        self.model = strategy.model if model is None else model
        self.forward: nn.Module = self.model
        if self.world > 1:
            device = next(iter(self.model.parameters())).device
            self._patched = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for m in self._patched:
                m.forward = types.MethodType(functools.partial(_sync_bn_forward, share=self._share), m)
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> tuple[int, int, float]:
        """(lo, hi, scale) of a minibatch of ``n`` rows: this rank takes rows [lo, hi) and multiplies its
        mean loss by ``scale``. A rank whose share is empty (``n`` < ranks) still runs the step — DDP needs
        every rank's backward — on a stand-in, row 0, with ``scale`` 0 (and BatchNorm leaves it out of the
        statistics)."""
        if self.world == 1:
            return 0, n, 1.0
        lo, hi = dist.shard_rows(n, self.rank, self.world)
        self._share[0] = 1.0 if hi > lo else 0.0
        return (lo, hi, self.world * (hi - lo) / n) if hi > lo else (0, 1, 0.0)

    def scaled(self, loss: torch.Tensor, scale: float) -> torch.Tensor:
        """This rank's loss as its share of the whole minibatch's (``loss`` itself in one process)."""
        return loss * scale if self.world > 1 else loss

    def mean_over_ranks(self, total: torch.Tensor) -> torch.Tensor:
        """The whole minibatches' loss from each rank's sum of :meth:`scaled` losses (for the progress bar)."""
        return dist.all_reduce_sum(total) / self.world if self.world > 1 else total

    def finish(self) -> None:
        """After training: every rank takes rank 0's buffers (they agree up to the last bits: BatchNorm's
        running statistics come from the same global sums, reduced in each rank's order), so that all
        evaluate the same model; the DDP wrapper and the BatchNorm patch are dropped."""
        if self.world > 1:
            with torch.no_grad():
                for b in self.model.buffers():
                    dist.broadcast_(b)
        for m in self._patched:
            del m.forward  # the class's forward again
        self._patched = []
        self.forward = self.model
