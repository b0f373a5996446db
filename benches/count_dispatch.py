"""Ops dispatched by one DeepInversion step: its GPU cost, measured on the CPU by counting (issue 41).

A synthesis step on a small batch is bound on a GPU by its kernel launches and host syncs, not by its arithmetic;
both are visible on the CPU as the ops the step dispatches. For one step (forward + backward + Adam update) on a
CIFAR ResNet-18 (``resnet18_cifar``, 3 x 32 x 32, 20 BN layers) and LeNet-5-BN (``lenet5_bn``, 1 x 32 x 32, 4 BN
layers), random-init teachers with calibrated BN statistics, at batch 8 (``--batch``), this records for three
loops:

  public frozen  one iteration of exml_fast.reference.public.deepinversion.public_deepinversion (the faithful
                 port of NVlabs' CIFAR loop) with the teacher's parameters frozen, as bench_synthesis.py's peer:
                 the counted window runs from the end of one iteration to the end of the next (its ``callback``),
                 so it holds the jitter draw, both zero_grads, the forward with the public BN hooks, the losses,
                 ``loss.item()``, the history bookkeeping, the backward and Adam's step;
  matcher        the same step as a user writes it by hand with exml_fast.synth.matcher.BNStatsMatcher (its docstring's
                 pattern): one roll per batch from a CPU generator, ``CE + 10 * bn.loss() + 2.5e-5 *
                 image_priors(x_jit)[1]``, ``loss.backward()``, torch.optim.Adam; no ``.item()``, no history;
  engine         one call of exml_fast.synth.DeepInversion's step function (augment, forward, losses,
                 autograd.grad, the on-device Adam update and best-batch selection), with bench_synthesis.py's
                 objective: CE + 10 R_BN + 2.5e-5 TV-l2, Adam lr 0.05 constant, 2-px roll, no flips. The progress
                 refresh (once per ``log_every`` steps, outside the step) is measured apart.

Each loop runs three steps in one call: step 1 warms up, step 2 is counted by the dispatch mode and step 3 by the
profiler (exml_fast._utils.dispatch_count: DispatchCounter, LeafOpCounter). "BN off" is the same loop without the
BN term (public: no hooks; matcher: no matcher; engine: bn_weight 0), and (on - off) / BN layers is the BN term's
cost per layer. Last, the fixed cost of one tiny call (forward + backward) of each exml_fast op: median
microseconds on one thread (torch.utils.benchmark, ten interleaved rounds), its ratio to a plain PyTorch tiny
call timed in the same rounds, and its counts.

The counts are the CPU's dispatch: on a GPU some paths differ (frozen_bn_stats is fused on the CPU only, fast_layers
and the input-gradient convolutions are CPU-only, augment_with_params checks its parameters only on the CPU).

Usage:
    python benches/count_dispatch.py [--nets resnet18 lenet5_bn] [--batch 8] [--no-tiny] [--min-run-time 2]
        [--rounds 10] [--threads 1] [--stem dispatch_counts_cpu] [--suffix _before] [--out benches/results]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import os
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from benchlib import RESULTS, ROOT, env_markdown, environment, median, record
from bench_synthesis import BN_WEIGHT, FLIP, JITTER, L2_WEIGHT, LR, SHAPES, TV_L2_WEIGHT, exml_synth, targets_for
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import benchmark

import exml_fast
from exml_fast import ops
from exml_fast._utils.dispatch_count import DispatchCounter, LeafOpCounter
from exml_fast.models import build_model
from exml_fast.reference.public import deepinversion as public_port
from exml_fast.synth.matcher import BNStatsMatcher

#: The nets: registry name of the architecture (exml_fast.models.ARCHS); input shapes are bench_synthesis.py's.
ARCHS = {"resnet18": "resnet18_cifar", "lenet5_bn": "lenet5_bn"}
VARIANTS = ("public frozen", "matcher", "engine")
PEER = "public frozen"
#: Steps each counted loop runs: the warm-up, the dispatch-counted step, the profiled step.
STEPS = 3
DEFAULT_STEM = "dispatch_counts_cpu"


# -- teachers -----------------------------------------------------------------------------------------------


@functools.cache
def teacher(net: str) -> nn.Module:
    """The random-init ``net`` (seed 0) with BN running statistics from four train-mode forwards of N(0.1, 0.7²)
    batches of 16, in eval mode. Cached: every loop works on its own deep copy."""
    if net not in ARCHS:
        raise ValueError(f"count_dispatch: net must be one of {', '.join(ARCHS)}; got {net!r}")
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ARCHS[net])
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, *SHAPES[net], generator=g) * 0.7 + 0.1)
    return model.eval()


def bn_layers(model: nn.Module) -> int:
    """The BN layers whose statistics the BN term matches (every one that tracks running statistics)."""
    return sum(1 for m in model.modules()
               if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None)


def frozen_copy(model: nn.Module) -> nn.Module:
    t = copy.deepcopy(model)
    t.requires_grad_(False)  # bench_synthesis.py's "public frozen": no weight gradients
    return t


# -- the counted windows ------------------------------------------------------------------------------------


class StepWindows:
    """Counters by step index (0-based): ``counters[k]`` is active exactly while step k runs. The loops call
    ``start(k)`` before step k and ``stop(k)`` after it; ``close()`` stops whatever is still active (an error
    inside a counted step)."""

    def __init__(self, counters: dict[int, DispatchCounter | LeafOpCounter]) -> None:
        self.counters = counters
        self.open: DispatchCounter | LeafOpCounter | None = None

    def start(self, k: int) -> None:
        counter = self.counters.get(k)
        if counter is not None:
            counter.__enter__()
            self.open = counter

    def stop(self, k: int) -> None:
        counter = self.counters.get(k)
        if counter is not None and counter is self.open:
            self.open = None
            counter.__exit__(None, None, None)

    def close(self) -> None:
        if self.open is not None:
            counter, self.open = self.open, None
            counter.__exit__(None, None, None)


def _no_hooks(model, *, all_bn=False):
    return []


def run_public(net: str, batch: int, windows: StepWindows, *, bn: bool = True) -> dict:
    """``STEPS`` iterations of the public loop on a frozen copy of the teacher; step k's window runs from the end
    of iteration k - 1 (its callback) to the end of iteration k, so step 0 cannot be counted. Returns
    ``{"best_copies": [k, ...]}``: the steps that copied the batch as the best so far (a data-dependent
    ``aten::clone``)."""
    if 0 in windows.counters:
        raise ValueError("run_public: step 0 cannot be counted (its window opens at the callback of step -1)")
    t = frozen_copy(teacher(net))
    best = [None]
    copies = []

    def callback(it, cost):
        windows.stop(it)
        windows.start(it + 1)

    def best_callback(it, best_inputs):
        if best_inputs is not best[0] and it > 0:
            copies.append(it)
        best[0] = best_inputs

    # BN off: the loop's hook factory returns no hooks (the loop then adds 10 * 0).
    hooks = contextlib.nullcontext() if bn else mock.patch.object(public_port, "deepinversion_bn_loss_hooks",
                                                                  _no_hooks)
    with hooks:
        public_port.public_deepinversion(
            t, targets_for(batch, "cpu"), iterations=STEPS, lr=LR, bn_reg_scale=BN_WEIGHT,
            tv_l2_scale=TV_L2_WEIGHT, l2_scale=L2_WEIGHT, jitter=JITTER, flip=FLIP, generator=0,
            input_shape=SHAPES[net], all_bn=True, callback=callback, best_callback=best_callback)
    return {"best_copies": copies}


def run_matcher(net: str, batch: int, windows: StepWindows, *, bn: bool = True) -> dict:
    """``STEPS`` steps of the hand-written loop with BNStatsMatcher (see the module docstring)."""
    t = frozen_copy(teacher(net))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *SHAPES[net]), generator=g).requires_grad_(True)
    y = targets_for(batch, "cpu")
    opt = torch.optim.Adam([x], lr=LR)
    matcher = BNStatsMatcher(t, form="l2", first_bn_multiplier=1.0) if bn else None
    with matcher if matcher is not None else contextlib.nullcontext():
        for k in range(STEPS):
            windows.start(k)
            dx, dy = (int(v) for v in torch.randint(-JITTER, JITTER + 1, (2,), generator=g))
            opt.zero_grad()
            xj = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(t(xj), y) + TV_L2_WEIGHT * ops.image_priors(xj)[1]
            if matcher is not None:
                loss = loss + BN_WEIGHT * matcher.loss()
            loss.backward()
            opt.step()
            windows.stop(k)
    return {}


def counted_steps(synth, windows: StepWindows) -> None:
    """Makes ``synth``'s step function open ``windows``' counters around its k-th call (the engine has no public
    per-step hook: this replaces its ``_step_fn`` on the instance, and ``synthesize`` runs as always)."""
    if not callable(getattr(synth, "_step_fn", None)):
        raise RuntimeError(f"count_dispatch: {type(synth).__name__} has no _step_fn to count the steps of: the "
                           "engine changed, update benches/count_dispatch.py's counted_steps")
    make = synth._step_fn

    def step_fn():
        step = make()
        calls = itertools.count()

        def counted(*args):
            k = next(calls)
            windows.start(k)
            try:
                return step(*args)
            finally:
                windows.stop(k)
        return counted

    synth._step_fn = step_fn


def engine(net: str, *, bn: bool = True, log_every: int = 50):
    """bench_synthesis.py's engine (exml_synth: its objective, fp32, CPU defaults) on a copy of the teacher; no
    agreement warning (three steps never reach it)."""
    return exml_synth(teacher(net), net, "cpu", precision="fp32", log_every=log_every, warn_below=None,
                      **({} if bn else {"bn_weight": 0.0}))


def run_engine(net: str, batch: int, windows: StepWindows, *, bn: bool = True) -> dict:
    """One ``STEPS``-iteration synthesis of ``batch`` images, the step function's calls counted by ``windows``."""
    synth = engine(net, bn=bn)
    counted_steps(synth, windows)
    synth.synthesize(batch, iterations=STEPS, batch_size=batch, generator=0, progress=False)
    return {}


#: Each runs ``STEPS`` steps of its loop, ``windows`` counting some, and returns facts of the run (a dict).
RUNNERS: dict[str, Callable[..., dict]] = {"public frozen": run_public, "matcher": run_matcher,
                                           "engine": run_engine}


# -- counting ---------------------------------------------------------------------------------------------------


def _relative_sites(sites: dict[str, int]) -> dict[str, int]:
    root = str(ROOT) + "/"
    return {k.replace(root, ""): v for k, v in sites.items()}


def counts(dispatch: DispatchCounter, leaves: LeafOpCounter) -> dict:
    """One step's counts as plain data: ``ops``, ``views``, ``markers``, ``syncs``, ``leaf_ops`` and their
    breakdowns."""
    s = dispatch.summary()
    return {"ops": s["ops"], "views": s["views"], "markers": s["markers"], "syncs": s["syncs"],
            "leaf_ops": leaves.total, "by_op": s["by_op"], "views_by_op": s["views_by_op"],
            "markers_by_op": s["markers_by_op"], "syncs_by_kind": s["syncs_by_kind"],
            "sync_sites": _relative_sites(s["sync_sites"]), "leaf_by_op": leaves.summary()["by_op"],
            "profiler_syncs": leaves.summary()["syncs"], "profiler_syncs_by_op": leaves.summary()["syncs_by_op"]}


def count_step(net: str, variant: str, batch: int, *, bn: bool = True) -> dict:
    """The counts of one step (after one warm-up step) of ``variant`` on ``net`` at ``batch``, on the CPU, as a
    dict: ``ops``, ``views``, ``markers``, ``syncs`` (DispatchCounter, step 2), ``leaf_ops`` and
    ``profiler_syncs`` (LeafOpCounter, step 3), their breakdowns ``by_op``, ``views_by_op``, ``markers_by_op``,
    ``syncs_by_kind``, ``sync_sites`` (paths relative to the repository), ``leaf_by_op``,
    ``profiler_syncs_by_op``, and for the public loop ``best_copies`` (the steps that copied the best batch).
    ``bn=False``: the same loop without the BN term. Deterministic for fixed arguments and code.

    Args:
        net: "resnet18" or "lenet5_bn".
        variant: "public frozen", "matcher" or "engine".
        batch: images per step, >= 1.
    """
    if variant not in RUNNERS:
        raise ValueError(f"count_step: variant must be one of {', '.join(RUNNERS)}; got {variant!r}")
    if net not in ARCHS:
        raise ValueError(f"count_step: net must be one of {', '.join(ARCHS)}; got {net!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"count_step: batch must be an int >= 1; got {batch!r}")
    dispatch, leaves = DispatchCounter(), LeafOpCounter()
    windows = StepWindows({1: dispatch, 2: leaves})
    try:
        facts = RUNNERS[variant](net, batch, windows, bn=bn)
    finally:
        windows.close()
    if not dispatch.ops or not leaves.ops:
        raise RuntimeError(f"count_step: {variant} on {net} ran fewer than {STEPS} steps")
    return {**counts(dispatch, leaves), **facts}


def refresh_cost(net: str, batch: int) -> dict:
    """What one progress refresh of the engine adds (it reads the loss terms once per ``log_every`` steps):
    a whole 2-step synthesis with ``log_every=1`` (two refreshes) minus one with ``log_every=2`` (one)."""
    out = []
    for log_every in (1, 2):
        synth = engine(net, log_every=log_every)
        with DispatchCounter() as c:
            synth.synthesize(batch, iterations=2, batch_size=batch, generator=0, progress=False)
        out.append(c)
    more, less = out
    return {"ops": more.total_ops - less.total_ops, "views": more.total_views - less.total_views,
            "syncs": more.total_syncs - less.total_syncs,
            "syncs_by_kind": {k: v for k, v in (more.syncs - less.syncs).items()}}


def step_record(net: str, batch: int, variant: str) -> dict:
    """``count_step`` with and without the BN term, and the BN term's cost per BN layer."""
    on = count_step(net, variant, batch)
    off = count_step(net, variant, batch, bn=False)
    layers = bn_layers(teacher(net))
    per_layer = {k: (on[k] - off[k]) / layers for k in ("ops", "views", "syncs", "leaf_ops")}
    return {"net": net, "arch": ARCHS[net], "batch": batch, "variant": variant, "bn_layers": layers,
            "bn_on": on, "bn_off": off, "bn_per_layer": per_layer}


# -- tiny calls of every op ------------------------------------------------------------------------------------


def tiny_calls() -> dict[str, Callable[[], object]]:
    """One forward + backward (``torch.autograd.grad`` with gradient outputs made beforehand) of each exml_fast op
    on its smallest valid input, by op name: (1, 1) or (1, 1, 1, 1), window_pool (1, 1, 2, 2) for its 2 x 2
    window; augment includes its per-sample draw (max_shift 1, flips); dirichlet_targets is forward only (it is
    not differentiable)."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(shape, generator=g).requires_grad_(True)

    x2, x4, w = leaf(1, 1), leaf(1, 1, 1, 1), leaf(1, 1)
    x1, pool_x, logits = leaf(1), leaf(1, 1, 2, 2), leaf(1, 1)
    scale, shift = torch.ones(1), torch.zeros(1)
    target = torch.ones(1, 1)
    conc = torch.ones(1, 1)
    gen = torch.Generator().manual_seed(1)

    def fwd_bwd(fn, inputs):
        outs = fn()
        grads = [torch.ones_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
        return lambda: torch.autograd.grad(fn(), inputs, grads)

    return {
        "bn_stats": fwd_bwd(lambda: ops.bn_stats(x2), x2),
        "frozen_bn_stats": fwd_bwd(lambda: ops.frozen_bn_stats(x2, scale, shift), x2),
        "image_priors": fwd_bwd(lambda: ops.image_priors(x4), x4),
        "augment": fwd_bwd(lambda: ops.augment(x4, max_shift=1, flip=True, generator=gen), x4),
        "class_similarity": fwd_bwd(lambda: ops.class_similarity(w), w),
        "dirichlet_targets": lambda: ops.dirichlet_targets(conc, generator=gen),
        "soft_target_cross_entropy": fwd_bwd(lambda: ops.soft_target_cross_entropy(logits, target), logits),
        "tanh": fwd_bwd(lambda: ops.tanh(x1), x1),
        "window_pool": fwd_bwd(lambda: ops.window_pool(pool_x, 2), pool_x),
    }


#: The reference tiny call timed beside the ops: ``torch.autograd.grad(x * w, x)`` on (1, 1) tensors, two ATen
#: ops (``mul`` forward and backward) through PyTorch's own C++ autograd. Ratios to it cancel the load of a
#: shared machine; what an op costs above it is its Python wrapper, checks and autograd wiring.
BASELINE = "torch x * w (baseline)"


def baseline_call() -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 1, generator=g).requires_grad_(True), torch.randn(1, 1, generator=g)
    grad = torch.ones(1, 1)
    return lambda: torch.autograd.grad(x * w, x, grad)


def tiny_record(min_run_time: float, rounds: int = 10) -> list[dict]:
    """Each tiny call's microseconds on one thread, timed in ``rounds`` rounds (the order rotated each round;
    torch.utils.benchmark's blocked_autorange for ``min_run_time / rounds`` seconds per call and round): the
    median over the rounds and their range, and the median of the per-round ratios to :data:`BASELINE`; with
    each call's dispatch and profiler counts."""
    calls = {BASELINE: baseline_call(), **tiny_calls()}
    names = list(calls)
    rows = {}
    for name, fn in calls.items():
        fn()  # warm-up
        with DispatchCounter() as d:
            fn()
        with LeafOpCounter() as p:
            fn()
        rows[name] = {"op": name, "ops": d.total_ops, "views": d.total_views, "syncs": d.total_syncs,
                      "leaf_ops": p.total, "profiler_syncs": p.summary()["syncs"], "by_op": d.summary()["by_op"],
                      "leaf_by_op": p.summary()["by_op"], "rounds_us": []}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            m = benchmark.Timer(stmt="fn()", globals={"fn": calls[name]}, num_threads=1).blocked_autorange(
                min_run_time=min_run_time / rounds)
            rows[name]["rounds_us"].append(m.median * 1e6)
    base = rows[BASELINE]["rounds_us"]
    for row in rows.values():
        us = row["rounds_us"]
        row.update(us=median(us), us_min=min(us), us_max=max(us),
                   vs_baseline=median([u / b for u, b in zip(us, base)]))
        print(f"  {row['op']:26s} {row['us']:8.1f} us [{row['us_min']:.1f}-{row['us_max']:.1f}] "
              f"{row['vs_baseline']:5.2f}x baseline  ops {row['ops']:2d}  views {row['views']:2d}  "
              f"syncs {row['syncs']} ({row['profiler_syncs']} nested)  leaf ops {row['leaf_ops']:2d}", flush=True)
    return list(rows.values())


# -- output ----------------------------------------------------------------------------------------------------


def ratios(steps: list[dict]) -> list[dict]:
    """Each variant's totals against the public frozen loop's on the same net."""
    peer = {r["net"]: r["bn_on"] for r in steps if r["variant"] == PEER}
    out = []
    for r in steps:
        if r["net"] in peer and r["variant"] != PEER:
            out.append({"net": r["net"], "variant": r["variant"],
                        "ops": r["bn_on"]["ops"] / peer[r["net"]]["ops"],
                        "leaf_ops": r["bn_on"]["leaf_ops"] / peer[r["net"]]["leaf_ops"]})
    return out


def print_steps(steps: list[dict]) -> None:
    print(f"{'net':10s} {'variant':14s} {'ops':>5s} {'views':>5s} {'syncs':>5s} {'leaf':>5s} | "
          f"{'off ops':>7s} {'off leaf':>8s} | {'BN ops/layer':>12s} {'BN leaf/layer':>13s}")
    for r in steps:
        on, off, pl = r["bn_on"], r["bn_off"], r["bn_per_layer"]
        print(f"{r['net']:10s} {r['variant']:14s} {on['ops']:5d} {on['views']:5d} {on['syncs']:5d} "
              f"{on['leaf_ops']:5d} | {off['ops']:7d} {off['leaf_ops']:8d} | {pl['ops']:12.2f} "
              f"{pl['leaf_ops']:13.2f}")


WHAT_IS_COUNTED = """\
## What is counted

- **ops**: every op call that reaches the dispatcher's Python key during the step
  (`exml_fast._utils.dispatch_count.DispatchCounter`, a `TorchDispatchMode`), forward, backward (the autograd
  engine's calls) and optimiser, views excluded. An op counts once whatever it runs inside its kernel: the `at::`
  calls of a C++ kernel (exml_fast's custom ops, and composites such as `aten::convolution` choosing a backend)
  are **not** seen. `CompositeImplicitAutograd` ops (`cross_entropy`, `linear`, `reshape`, `item`) are decomposed
  before the Python key, so their parts count instead.
- **views**: ops that only make or reshape a view (schema returns an alias it does not write: `view`, `t`,
  `expand`, `detach`, `select`, ...; the `inplace_view` tag: `as_strided_`, `unsqueeze_`; and `_unsafe_view`).
  Listed apart: they launch nothing.
- **syncs**: host syncs, recognised by the op, not by the device (on the CPU every tensor is on the host):
  `_local_scalar_dense` (`.item()`, `float(t)`, `int(t)`, `bool(t)`), data-dependent output sizes (`nonzero`,
  `masked_select`, `unique`, boolean-mask indexing, ...), `equal`/`allclose`, copies to the host from another
  device, and `Tensor.tolist()`/`.numpy()` (seen through a `TorchFunctionMode`). A read of a tensor that stays on
  the CPU on a GPU machine (Adam's step counter, the public loop's jitter draw) is counted but would not sync a
  GPU: the sites say which is which.
- **leaf ops**: the profiler's count (`LeafOpCounter`, `torch.profiler`, CPU activity): op events, nested ones
  included, with no working op below them, that are not views, pure allocations (`empty*`, `resize_`, `set_`)
  or `CompositeImplicitAutograd`. It sees into composites and custom ops: a custom op whose kernel only allocates
  is one leaf; an op whose kernel calls a working op counts as that op (a CPU `aten::mul` by a Python scalar as
  the `aten::copy_` converting the scalar, `aten::sum` as the `aten::fill_` zeroing its output, a kernel's
  `contiguous()` copy instead of the kernel), so the total is a proxy for launches, the names are the CPU's.
- **step**: each loop runs 3 steps in one call: step 1 warms up, step 2 is dispatch-counted, step 3 profiled.
- **BN per layer**: (step with the BN term - the same loop without it) / BN layers. Public: no hooks (the loop
  then adds 10 * 0); matcher: no matcher; engine: `bn_weight=0`. The BN layers themselves run in both.
- Not counted: the set-up and teardown of a synthesis call, the engine's progress refresh (listed apart), and
  anything of the GPU's own dispatch: there `frozen_bn_stats` is not fused, `fast_layers` and the input-gradient
  convolutions are off, and `augment_with_params` skips the CPU's parameter checks.
"""


def to_markdown(rec: dict) -> str:
    cmd = " ".join(["python benches/count_dispatch.py", *rec["argv"]])
    lines = env_markdown(rec["env"], "dispatch counts (DeepInversion step)", cmd)
    intro, loops = __doc__.split("\n\n")[1:3]
    lines += [intro, "", "```", loops, "```", "",
              WHAT_IS_COUNTED]
    lines += ["## One step", "", "| net | batch | loop | ops | views | syncs | leaf ops | ops, BN off | leaf ops, "
              "BN off | BN ops / BN layer | BN leaf ops / BN layer |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"
              "---:|---:|"]
    for r in rec["steps"]:
        on, off, pl = r["bn_on"], r["bn_off"], r["bn_per_layer"]
        lines.append(f"| {r['net']} ({r['bn_layers']} BN) | {r['batch']} | {r['variant']} | {on['ops']} | "
                     f"{on['views']} | {on['syncs']} | {on['leaf_ops']} | {off['ops']} | {off['leaf_ops']} | "
                     f"{pl['ops']:.2f} | {pl['leaf_ops']:.2f} |")
    if rec["ratios"]:
        lines += ["", f"Against **{PEER}** on the same net (ops, leaf ops): " + "; ".join(
            f"{q['net']} {q['variant']} {q['ops']:.2f}x, {q['leaf_ops']:.2f}x" for q in rec["ratios"]) + "."]
    for net, rf in rec["refresh"].items():
        lines += ["", f"Engine progress refresh on {net} (once per `log_every` steps; bench_synthesis.py uses 50): "
                  f"{rf['ops']} ops, {rf['views']} views, {rf['syncs']} host sync(s) ("
                  + (", ".join(f"{k} {v}" for k, v in rf["syncs_by_kind"].items()) or "none") + ")."]
    for r in rec["steps"]:
        on = r["bn_on"]
        lines += ["", f"### {r['net']}, {r['variant']}: host syncs and top ops", ""]
        lines += [f"- sync `{site}` x{n}" for site, n in on["sync_sites"].items()] or ["- no host sync"]
        lines.append(f"- the profiler saw {on['profiler_syncs']} sync op(s) at any depth"
                     + (f" ({', '.join(f'`{k}` {v}' for k, v in on['profiler_syncs_by_op'].items())})"
                        if on["profiler_syncs"] else "") + "; Python-level reads (`Tensor.tolist`) are not among them")
        if on["markers"]:
            lines.append(f"- {on['markers']} profiler range markers (torch.optim's `record_function`), not in ops: "
                         + ", ".join(f"`{k}` {v}" for k, v in on["markers_by_op"].items()))
        if "best_copies" in on:
            copied = {"BN on": 1 in on["best_copies"], "BN off": 1 in r["bn_off"]["best_copies"]}
            lines.append("- the best-batch copy (`aten::clone`, when the loss is the lowest so far: data-dependent) "
                         "ran in the counted step: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                                                 for k, v in copied.items()))
        top = list(on["by_op"].items())[:12]
        lines += ["", "Top ops (dispatch count): " + ", ".join(f"`{k}` {v}" for k, v in top) + "."]
        top = list(on["leaf_by_op"].items())[:12]
        lines += ["", "Top leaf ops (profiler): " + ", ".join(f"`{k}` {v}" for k, v in top) + "."]
    if rec["tiny"]:
        lines += ["", "## Fixed cost of one tiny call (forward + backward), one thread", "",
                  "Smallest valid input ((1, 1), (1, 1, 1, 1); window_pool (1, 1, 2, 2)); augment with its draw; "
                  "dirichlet_targets forward only. Microseconds: the median over "
                  f"{len(rec['tiny'][0]['rounds_us'])} interleaved rounds [min-max] (each round the median of "
                  "torch.utils.benchmark's blocks), and the median of the per-round ratios to the baseline, "
                  "`torch.autograd.grad(x * w, x)` on (1, 1) tensors (two ATen ops through PyTorch's C++ autograd): "
                  "the ratio is what to compare across runs, the microseconds move with the machine's load "
                  f"(1-minute load average {rec['env']['load_average']['start']:.1f} at the start of this run, "
                  f"{rec['env']['load_average']['end']:.1f} at its end, on {rec['env']['load_average']['cpus']} CPUs). "
                  "Counts of one call; syncs in brackets: the profiler's, inside kernels too.", "",
                  "| op | µs per call | vs baseline | ops | views | syncs | leaf ops | ops dispatched "
                  "| leaf ops (profiler) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for t in rec["tiny"]:
            by_op = ", ".join(f"`{k}` {v}" for k, v in t["by_op"].items())
            leaves = ", ".join(f"`{k}` {v}" for k, v in t["leaf_by_op"].items())
            lines.append(f"| {t['op']} | {t['us']:.1f} [{t['us_min']:.1f}-{t['us_max']:.1f}] | "
                         f"{t['vs_baseline']:.2f}x | {t['ops']} | {t['views']} | {t['syncs']} ({t['profiler_syncs']}) "
                         f"| {t['leaf_ops']} | {by_op} | {leaves} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny-call fixed costs")
    p.add_argument("--min-run-time", type=float, default=2.0,
                   help="seconds of timed tiny calls per op, over the rounds (default 2)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the tiny calls (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--stem", default=DEFAULT_STEM, help=f"recorded files' stem (default {DEFAULT_STEM})")
    p.add_argument("--suffix", default="", help="appended to the stem, e.g. _before")
    p.add_argument("--out", default=str(RESULTS), help="directory for the recorded run ('' to not record)")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch: an int >= 1; got {args.batch}")
    if args.threads < 1:
        p.error(f"--threads: an int >= 1; got {args.threads}")
    if args.min_run_time <= 0:
        p.error(f"--min-run-time: seconds > 0; got {args.min_run_time}")
    if args.rounds < 1:
        p.error(f"--rounds: an int >= 1; got {args.rounds}")
    if not exml_fast.has_ops():
        p.error("exml_fast._C is not built: the ops would run their pure-PyTorch fallback")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    env = environment("cpu", "dispatch counts (DeepInversion step)")
    env["load_average"] = {"start": os.getloadavg()[0], "cpus": os.cpu_count()}
    steps = []
    for net in args.nets:
        for variant in args.variants:
            steps.append(step_record(net, args.batch, variant))
            print(f"  counted {net} {variant}", flush=True)
    print()
    print_steps(steps)
    refresh = {net: refresh_cost(net, args.batch) for net in args.nets if "engine" in args.variants}
    tiny = []
    if not args.no_tiny:
        print("\ntiny calls (forward + backward, one thread):")
        tiny = tiny_record(args.min_run_time, args.rounds)
    env["wall_s"] = time.perf_counter() - t0
    env["load_average"]["end"] = os.getloadavg()[0]
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "args": {k: v for k, v in vars(args).items() if k != "out"}, "steps": steps, "ratios": ratios(steps),
           "refresh": refresh, "tiny": tiny}
    record(args.out, args.stem + args.suffix, rec, to_markdown(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
