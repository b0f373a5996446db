"""End-to-end DeepInversion synthesis speed: exml_fast.synth.DeepInversion against
the public DeepInversion CIFAR-10 loop, as a careful user already has it.

Teachers: CIFAR ResNet-18 and ResNet-34 (exml_fast.models), random init, with
a few train-mode forwards on N(0, 1)-like data first so the BatchNorm running
statistics are not the defaults (the BN loss then has something to match), at
batch 64 on the CPU and 256 on a GPU (CIFAR shapes, 3 x 32 x 32); LeNet-5-BN
trained for one epoch on MNIST (when the files are found; else calibrated like
the ResNets) at batch 256; on request (--nets resnet50) the ImageNet ResNet-50
(torchvision's, random init, calibrated the same way) at 224 px, batch 64. The
objective (the issue's): CE + 10 · R_BN (every BN layer, l2 form, no first-layer
multiplier) + 2.5e-5 · TV-l2, Adam lr 0.05 at a constant rate, a 2-px roll, no
flips, no clipping (mean/std None), no l2 term.

Variants, each with its own deep copy of the teacher:
  public as shipped   exml_fast.reference.public.deepinversion.public_deepinversion
                      with the teacher's parameters still requiring grad (as the
                      public script leaves them): every backward also computes
                      the weight gradients. Kept for reference only: it is
                      avoidable waste, not the peer.
  public frozen       the same loop with one line added, the teacher frozen
                      (requires_grad_(False)): THE PEER every ratio is against.
  public frozen+compile  the frozen teacher wrapped in torch.compile, the next
                      peer a user reaches for.
  exml fp32           exml_fast.synth.DeepInversion at its defaults (on the CPU:
                      channels_last picked for the ResNets, fused frozen-BN
                      statistics, the input-gradient swap on 1-channel layers;
                      on a GPU: fused frozen-BN statistics, the step captured in
                      a CUDA graph).
  exml fp32 eager     on a GPU, listed: the same without the CUDA graph
                      (cuda_graph=False), what the graph brings.
  exml fp32 cl        on a GPU, listed: the defaults with channels_last=True,
                      to choose the GPU's default memory format by measurement.
The engine runs with the public loop's objective and optimiser (see
exml_runner), so only the implementation differs.

With --best (the default on a GPU) each side also runs in its best form, and the
comparisons pair precision with precision:
  public frozen bf16+cl+compile(<mode>)  the frozen peer as a careful GPU user
                      runs it: bf16 autocast (the loop's use_amp), the teacher's
                      weights in channels_last, and the teacher — its forward
                      with the public BN hooks, which dynamo inlines into one
                      graph — under torch.compile(mode=<mode>), for each of
                      --compile-modes (default max-autotune and reduce-overhead);
                      the faster is "the best peer".
  exml bf16+cl+graph  the engine with precision="bf16", channels_last=True and
                      cuda_graph=True (the whole step in one CUDA graph); with
                      --exml-compile also that with compile=True.
exml fp32 is compared with public frozen (fp32 eager), the engine's best form
with the best peer; public frozen at fp32 is every row's second ratio.
--bn-share adds each side's step without the BN term (the public loop with no BN
hooks; the engine at bn_weight 0): the term's share of a step.

How a step is timed (the honest per-iteration cost, set-up removed): each
variant runs a whole synthesis call through its public API for K1 and for K2
iterations from the same seed, and a step costs (t(K2) - t(K1)) / (K2 - K1).
Set-up that does not scale with the iterations cancels. On a GPU each call
is timed with CUDA events. Calls are timed round-robin with the order rotated each round, so the per-round ratios cancel
the drift of a shared machine; the speed-up printed is the median of the
per-round ratios against "public frozen" (min-max in brackets), and each
median is the true median (mean of the middle two for an even count). One call
of each variant warms up first (torch.compile compiles there).

Time to quality (--ttq-steps N): the frozen peer runs N steps on one batch; the
quality bar is the BN term of the batch it returns, measured by one clean
forward of that batch (no augmentation), and 95 % teacher agreement. The peer's
time to quality is read off that one run: its best batch so far is measured
every N/40 steps with the clock paused (a call of k steps returns exactly the
batch the run has after step k: the loop's step size is constant and its draws
come from the seed). The engine's is the wall time of the shortest whole call
(step counts on a grid of N/40, found by a galloping search and bisection)
whose returned batch meets the bar, measured the same way: its cosine step size
depends on the call's length. (The per-step loss terms are no measure of the
batch: they are taken on an augmented copy, and the peer's one roll for the
whole batch makes its BN term jump from step to step — its lowest-loss step is
a lucky draw, not a better batch.) The ResNets' teachers for the race are
trained (one pass over 10000 Fashion-MNIST images as 3-channel 32 x 32 copies,
ttq_teacher); every measurement is logged under --ttq-state and read back by a
rerun, so a race of hours resumes where it stopped. The issue asks for the
peer's 2000 steps at batch 256: on a 2-core CPU that is hours for a ResNet.

Equal final loss: both loops run --check-iterations from the same seeds and
report the total loss of the batch they return. The initial batches are drawn
differently and the augmentations differ (the public loop draws one roll for
the whole batch, the engine one per sample; the engine takes the TV prior on
the un-augmented x), so the losses agree only statistically: the check passes
when the mean losses differ by at most max(3 x the peer's spread over the
seeds, 2 % of the loss).

With --ttq-best (default with --best) the race is also run by the best forms:
the best peer (its compile mode: the winner of this run's timing, else the
first of --compile-modes), warmed up (compiled) before its run, is followed
along its own N steps against the same bar, and the engine's best form races it.

Usage:
    python benches/bench_synthesis.py [--device cpu|cuda] [--quick] [--nets resnet18 resnet34 lenet5_bn resnet50]
        [--best | --no-best] [--compile-modes max-autotune reduce-overhead] [--exml-compile] [--bn-share]
        [--batch N] [--k1 1|5] [--k2 4|105] [--rounds 3|5] [--check-iterations 10|200]
        [--seeds 0 1] [--no-compile] [--ttq-steps 200] [--ttq-only] [--ttq-cap 3] [--ttq-all-variants]
        [--ttq-best | --no-ttq-best] [--ttq-variants N] [--ttq-state runs/bench_synthesis] [--suffix S]
        [--out benches/results]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlib import ROOT, command_line, env_markdown, environment, op_parser, record, timed_call, true_median
from torch import nn

import exml_fast
from exml_fast.models import LeNet5BN, resnet18_cifar, resnet34_cifar
from exml_fast.reference.public.deepinversion import public_deepinversion

def resnet50_imagenet() -> nn.Module:
    """The ImageNet ResNet-50 (224 px, 10 outputs): torchvision's resnet50(weights=None), else the same
    network (bottleneck v1.5: the stride on the 3 x 3 convolution) built here, for a machine without
    torchvision."""
    try:
        from torchvision.models import resnet50
    except ImportError:
        return _resnet50_local()
    return resnet50(weights=None, num_classes=10)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _resnet50_local(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


NETS = {"resnet18": resnet18_cifar, "resnet34": resnet34_cifar, "lenet5_bn": LeNet5BN, "resnet50": resnet50_imagenet}
SHAPES = {"resnet18": (3, 32, 32), "resnet34": (3, 32, 32), "lenet5_bn": (1, 32, 32), "resnet50": (3, 224, 224)}
#: What a run times unless --nets says otherwise (ResNet-50 at 224 px is for GPUs: --nets resnet50).
DEFAULT_NETS = ["resnet18", "resnet34", "lenet5_bn"]
# Batch per net on the CPU (--batch overrides): the ResNets at 64 keep a round of the benchmark in minutes on
# two cores; LeNet-5-BN at the paper's 256.
CPU_BATCH = {"resnet18": 64, "resnet34": 64, "lenet5_bn": 256, "resnet50": 8}
#: Batch per net on a GPU: 256 fills an H100 at 32 px; ResNet-50 at 224 px, 64.
GPU_BATCH = {"resnet18": 256, "resnet34": 256, "lenet5_bn": 256, "resnet50": 64}

# The objective timed (the issue's measurement): the public script's "paper parameters" (lr 0.05, BN weight
# 10, TV-l2 2.5e-5, no l2), a 2-px roll, no flips, no clip.
LR = 0.05
BN_WEIGHT = 10.0
TV_L2_WEIGHT = 2.5e-5
L2_WEIGHT = 0.0
JITTER = 2
FLIP = False
AGREEMENT = 0.95


def calibrated_teacher(name: str, device: str, *, seed: int = 0) -> nn.Module:
    """A random-init network whose BN running stats come from a few train-mode
    forwards on N(0.1, 0.7²) data (per-channel offsets), in eval mode; LeNet-5-BN
    is trained one epoch on MNIST instead when the files are found."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = NETS[name]().to(device)
    if name == "lenet5_bn":
        trained = _mnist_lenet(model, device, g)
        if trained is not None:
            return trained
    model.train()
    c, h, w = SHAPES[name]
    shift = torch.tensor([0.1, -0.05, 0.0][:c]).view(1, c, 1, 1)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(64, c, h, w, generator=g) * 0.7 + shift
            model(x.to(device))
    return model.eval()


def _mnist_lenet(model: nn.Module, device: str, g: torch.Generator) -> nn.Module | None:
    from exml_fast.data.datasets import find_data_root, mnist_tensors
    from exml_fast.training.core import evaluate, train_classifier

    if find_data_root("mnist") is None:
        print("  lenet5_bn: MNIST not found, using a calibrated random teacher", flush=True)
        return None
    x, y = mnist_tensors("train")
    model = train_classifier(model.to(device), x, y, epochs=1, batch_size=64, generator=g)
    xt, yt = mnist_tensors("test")
    print(f"  lenet5_bn: trained one epoch on MNIST, test accuracy {evaluate(model, xt, yt):.4f}", flush=True)
    return model.eval()


def targets_for(batch: int, device: str) -> torch.Tensor:
    return (torch.arange(batch) % 10).to(device)


PEER = "public frozen"


# -- the variants: run(K, seed) -> final loss (a float) ---------------------------


@contextlib.contextmanager
def public_bn_hooks_off():
    """The public loop without its BN hooks: no hook is registered, so the BN term is 0 and costs nothing
    (its step without the BN term, for the term's share). The loop looks the hook factory up in its
    module's globals on every call; it is swapped there for the duration."""
    import exml_fast.reference.public.deepinversion as public

    saved = public.deepinversion_bn_loss_hooks
    public.deepinversion_bn_loss_hooks = lambda teacher, all_bn=False: []
    try:
        yield
    finally:
        public.deepinversion_bn_loss_hooks = saved


def public_teacher(teacher: nn.Module, *, frozen: bool = True, channels_last: bool = False,
                   compile_mode: str | None = None) -> nn.Module:
    """A copy of ``teacher`` as the public loop gets it: frozen (the one-line fix: no weight gradients), its
    weights in channels_last, under torch.compile(mode=compile_mode) ("default": torch.compile's default;
    None: eager). What is compiled is the teacher's forward, with the loop's BN hooks (registered on its
    layers per call), which dynamo inlines: one graph for the network and the hooks' statistics."""
    t = copy.deepcopy(teacher)
    t.requires_grad_(not frozen)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    if compile_mode is not None:
        t = torch.compile(t) if compile_mode == "default" else torch.compile(t, mode=compile_mode)
    return t


def public_runner(teacher: nn.Module, batch: int, device: str, *, name: str, frozen: bool = True,
                  compile_mode: str | None = None, channels_last: bool = False, use_amp: bool = False,
                  bn: bool = True, history: dict | None = None):
    t = public_teacher(teacher, frozen=frozen, channels_last=channels_last, compile_mode=compile_mode)
    y = targets_for(batch, device)

    def run(k: int, seed: int) -> float:
        with contextlib.nullcontext() if bn else public_bn_hooks_off():
            _, best_cost, losses = public_deepinversion(
                t, y, iterations=k, lr=LR, bn_reg_scale=BN_WEIGHT if bn else 0.0, tv_l2_scale=TV_L2_WEIGHT,
                l2_scale=L2_WEIGHT, jitter=JITTER, flip=FLIP, generator=seed, input_shape=SHAPES[name], all_bn=True,
                use_amp=use_amp)
        if history is not None:
            history.clear()
            history.update(losses)
        return best_cost
    return run


def exml_synth(teacher: nn.Module, name: str, device: str, **options):
    from exml_fast.synth import DeepInversion

    # The public CIFAR loop's objective and optimiser: no first-layer BN
    # multiplier, constant lr (no warm-up or cosine), no clipping (mean/std
    # None). log_every=50 is what a 2000-iteration job uses by default (one
    # host read of the loss terms per 50 steps); num_classes given so no probe
    # forward is made.
    kw = dict(preset="cifar", num_classes=10, lr=LR, schedule="constant", warmup=0.0, bn_weight=BN_WEIGHT,
              first_bn_multiplier=1.0, tv_l2_weight=TV_L2_WEIGHT, l2_weight=L2_WEIGHT, jitter=JITTER,
              flip=FLIP, keep_best=True, log_every=50)
    kw.update(options)
    return DeepInversion(copy.deepcopy(teacher), input_shape=SHAPES[name], mean=None, std=None, **kw)


def exml_runner(teacher: nn.Module, batch: int, device: str, *, name: str, **options):
    synth = exml_synth(teacher, name, device, **options)

    def run(k: int, seed: int) -> float:
        b = synth.synthesize(batch, iterations=k, batch_size=batch, generator=seed, progress=False)
        return float(b.losses["total"][-1])  # the kept (lowest-loss) batch's total
    return run


@dataclasses.dataclass
class Variant:
    """One timed loop: ``run(K, seed)`` runs a K-step synthesis call and returns its final loss. ``side``:
    "public" or "exml"; ``form``: "fp32" (each side's fp32 form), "best" (its best-configured form) or
    "listed" (shown, compared with nobody); ``bn``: whether the BN term is in the objective; ``config``:
    what runs, in words, for the record."""

    run: object
    side: str
    form: str
    bn: bool = True
    config: str = ""


NO_BN = ", no BN term"


def public_best_label(mode: str | None) -> str:
    return "public frozen bf16+cl" + (f"+compile({mode})" if mode else "")


def exml_best_forms(device: str, *, with_compile: bool = False) -> list[tuple[str, dict]]:
    """(label, DeepInversion options) of the engine's best forms: bf16 autocast, channels_last, and on a GPU
    the whole step in one CUDA graph; with_compile: also that with its loss under torch.compile."""
    opts: dict = {"precision": "bf16", "channels_last": True}
    label = "exml bf16+cl"
    if device == "cuda":
        opts["cuda_graph"] = True
        label += "+graph"
    forms = [(label, opts)]
    if with_compile:
        forms.append((label + "+compile", {**opts, "compile": True}))
    return forms


def variants_for(teacher, name, args) -> dict[str, Variant]:
    b, d = args.batch_of[name], args.device
    v: dict[str, Variant] = {}

    def public(label, form, *, bn=True, config, **kw):
        v[label] = Variant(public_runner(teacher, b, d, name=name, bn=bn, **kw), "public", form, bn, config)

    def exml(label, form, *, bn=True, config, **options):
        if not bn:
            options["bn_weight"] = 0.0
        v[label] = Variant(exml_runner(teacher, b, d, name=name, **options), "exml", form, bn, config)

    if not args.best:
        public("public as shipped", "listed", frozen=False,
               config="fp32 eager, the teacher's parameters requiring grad as the public script leaves them")
    public(PEER, "fp32", config="fp32 eager, the teacher frozen")
    if args.bn_share:
        public(PEER + NO_BN, "fp32", bn=False, config="fp32 eager, the teacher frozen, no BN hooks")
    if not args.best and args.compile_modes:
        public("public frozen+compile", "listed", compile_mode=args.compile_modes[0],
               config=f"fp32, the frozen teacher under torch.compile(mode={args.compile_modes[0]})")
    if args.best:
        for mode in args.compile_modes or [None]:
            public(public_best_label(mode), "best", channels_last=True, use_amp=True, compile_mode=mode,
                   config="bf16 autocast, channels_last weights, the frozen teacher (with the BN hooks) "
                          + (f"under torch.compile(mode={mode})" if mode else "eager"))
    if args.port_only:
        return v
    exml("exml fp32", "fp32", precision="fp32", config="the engine's defaults, fp32")
    if d == "cuda":
        exml("exml fp32 eager", "listed", precision="fp32", cuda_graph=False,
             config="the engine's defaults, fp32, cuda_graph=False")
        exml("exml fp32 cl", "listed", precision="fp32", channels_last=True,
             config="the engine's defaults, fp32, channels_last=True (the default on CUDA is NCHW: unmeasured)")
    if args.bn_share:
        exml("exml fp32" + NO_BN, "fp32", bn=False, precision="fp32", config="fp32, bn_weight 0")
    if args.best:
        forms = exml_best_forms(d, with_compile=args.exml_compile)
        for label, options in forms:
            exml(label, "best", config=", ".join(f"{k}={v}" for k, v in options.items()), **options)
        if args.bn_share:
            label, options = forms[0]
            exml(label + NO_BN, "best", bn=False, config=", ".join(f"{k}={v}" for k, v in options.items())
                 + ", bn_weight 0", **options)
    return v


# -- timing -------------------------------------------------------------------------


def time_steps(variants: dict, args) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per iteration of each variant, one sample per round (see the module
    docstring), and the error of each variant that failed to run."""
    names = list(variants)
    failed = {}
    for n in names:  # warm-up: allocations, autotuning, compilation, graph capture
        try:
            t0 = time.perf_counter()
            timed_call(lambda: variants[n].run(args.k1, 0), args.device)
            print(f"  {n}: warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # a variant that cannot run is reported, not fatal
            failed[n] = f"{type(e).__name__}: {e}"
            print(f"  {n}: failed ({failed[n][:200]})", flush=True)
    names = [n for n in names if n not in failed]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t1 = timed_call(lambda: variants[n].run(args.k1, 0), args.device)
            t2 = timed_call(lambda: variants[n].run(args.k2, 0), args.device)
            samples[n].append((t2 - t1) / (args.k2 - args.k1))  # <= 0: below the noise (see below)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {samples[n][-1] * 1e3:.0f} ms/it" for n in names), flush=True)
    for n in failed:
        samples[n] = []
    return samples, failed


def clean_quality(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(teacher agreement, BN term) of a returned batch: one eval forward of x itself, no augmentation, the BN
    term in the objective's form (l2, every BN layer, no first-layer multiplier)."""
    from exml_fast.synth.matcher import BNStatsMatcher

    teacher.eval()
    with BNStatsMatcher(teacher, form="l2", first_bn_multiplier=1.0) as bn, torch.no_grad():
        out = teacher(x)
        loss = float(bn.loss())
    return int((out.argmax(1) == y).sum()) / len(y), loss


def smallest_steps(measure, grid: list[int], *, rel_tol: float = 0.0) -> tuple[int | None, float | None, list[dict]]:
    """The fewest steps in ``grid`` (increasing step counts) whose returned batch meets the bar;
    ``measure(steps) -> {"steps", "wall_s", "agreement", "bn", "meets"}`` runs (or reads back) one whole call.
    Galloping search (grid indices 0, 1, 3, 7, ... and the last) for the first probe that meets the bar, then
    bisection below it: about 2 log2(answer / grid step) probes, none longer than twice the answer, whatever
    the grid's end. The bisection stops once the step counts that miss and meet the bar are within
    ``rel_tol`` of the latter (0: adjacent on the grid): the answer is then a call that meets the bar and at
    most that fraction longer than the shortest one, so a speed-up from it errs low. Assumes the returned
    batch (the best so far by loss) only gets better with more steps; every probe is listed. Returns (steps,
    the wall seconds of that call, the probes)."""
    probes: list[dict] = []

    def probe(i: int) -> bool:
        probes.append(measure(grid[i]))
        return probes[-1]["meets"]

    lo, i = -1, 0  # grid[lo] does not meet the bar (-1: nothing below)
    while not probe(i):
        if i == len(grid) - 1:
            return None, None, probes
        lo, i = i, min(2 * i + 1, len(grid) - 1)
    hi = i
    while hi - lo > 1 and grid[hi] - (grid[lo] if lo >= 0 else 0) > rel_tol * grid[hi]:
        mid = (lo + hi) // 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    wall = next(p["wall_s"] for p in reversed(probes) if p["steps"] == grid[hi])
    return grid[hi], wall, probes


# -- time to quality: teachers, the peer's run, a resumable log ---------------------------

#: Fashion-MNIST training images one pass of the ResNet time-to-quality teachers sees (about 4 and 8 min on 2
#: cores); the rest of the set and the test split are not used to choose anything here.
TTQ_TRAIN_IMAGES = 10000
TTQ_STATE = ROOT / "runs" / "bench_synthesis"


def ttq_teacher(name: str, device: str, folder, calibrated: nn.Module, *, seed: int = 0) -> tuple[nn.Module, dict]:
    """The teacher of the time-to-quality race, in eval mode, and a few facts about it.

    A race on a random network says little about inverting a trained one, so the CIFAR-shaped ResNets are
    trained: one pass (SGD lr 0.05, batch 64) over TTQ_TRAIN_IMAGES Fashion-MNIST training images padded to
    32 x 32 and copied to 3 channels (CIFAR is not on these machines). The weights are kept in ``folder``
    (``teacher_<net>_fmnist_s<seed>.pt``, written atomically) and read back by a rerun, so a resumed race
    inverts the same teacher. LeNet-5-BN is ``calibrated`` (calibrated_teacher's: one epoch on MNIST), kept in
    ``folder`` as ``teacher_lenet5_bn_mnist_s<seed>.pt`` in the same way; so is a ResNet without the data (a
    random network, which the facts then say; not kept)."""
    from exml_fast.data.datasets import find_data_root, mnist_tensors
    from exml_fast.training.core import evaluate, train_classifier

    if name == "lenet5_bn" and find_data_root("mnist") is not None:
        # Trained afresh by every run, and on a GPU not bit-identically (its teacher hash, part of the race's
        # key, then differed and a rerun started over): the first run's weights are kept and read back.
        path = Path(folder) / f"teacher_{name}_mnist_s{seed}.pt"
        info = {"teacher": "trained one epoch on MNIST"}
        if path.exists():  # into a copy: the caller's teacher serves the run's other benchmarks
            calibrated = copy.deepcopy(calibrated)
            _read_teacher(path, calibrated)
            print(f"  {name}: read {path}", flush=True)
        else:
            _keep_teacher(path, calibrated, info)
        return calibrated.eval(), info
    if name == "lenet5_bn" or find_data_root("fashion-mnist") is None:
        return calibrated, {"teacher": "random init, calibrated BN statistics"}
    path = Path(folder) / f"teacher_{name}_fmnist_s{seed}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NETS[name]()
    if path.exists():
        info = _read_teacher(path, model)
        print(f"  {name}: read {path} ({info['teacher']})", flush=True)
    else:
        x, y = mnist_tensors("train", dataset="fashion-mnist")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(x.shape[0], generator=g)[:TTQ_TRAIN_IMAGES]
        t0 = time.perf_counter()
        x3 = x[idx].expand(-1, 3, -1, -1).contiguous()
        model.to(device)  # trained where the race runs: seconds on a GPU (whose draws differ from the CPU's)
        train_classifier(model, x3, y[idx], epochs=1, batch_size=64, lr=0.05, generator=g)
        recalibrate_bn(model, x3[:5000].to(device))
        xt, yt = mnist_tensors("test", dataset="fashion-mnist")
        acc = evaluate(model, xt[:2000].expand(-1, 3, -1, -1).contiguous(), yt[:2000])
        info = {"teacher": f"trained one pass over {TTQ_TRAIN_IMAGES} Fashion-MNIST images (3-channel copies, "
                           f"32 x 32) on {device}, BN statistics recomputed: {acc:.1%} on 2000 test images",
                "train_s": time.perf_counter() - t0}
        _keep_teacher(path, model, info)
        print(f"  {name}: {info['teacher']}, trained in {info['train_s']:.0f} s, saved to {path}", flush=True)
    return model.to(device).eval(), info


def _keep_teacher(path: Path, model: nn.Module, info: dict) -> None:
    """Writes a race teacher's weights (on the CPU) and facts to ``path``, atomically."""
    from exml_fast._utils.io import atomic_write

    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"state": state, "info": info}, f))


def _read_teacher(path: Path, model: nn.Module) -> dict:
    """Loads the weights :func:`_keep_teacher` wrote into ``model``; returns the facts kept with them."""
    from exml_fast._utils.io import load_torch_file

    saved = load_torch_file(path, what="teacher checkpoint")
    model.load_state_dict(saved["state"])
    return dict(saved["info"])


def recalibrate_bn(model: nn.Module, x: torch.Tensor, *, batch: int = 250) -> None:
    """Recomputes every BatchNorm layer's running statistics as plain averages over ``x`` under the final
    weights (train-mode forwards, no gradient; the model is left in eval mode). After one pass of training
    the running averages trail weights that moved under them: real images then score a BN term three times
    the recomputed statistics' (317 vs 101 on 256 Fashion-MNIST images, ResNet-18), so the term would
    measure the lag rather than the images."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
    for m in bns:
        m.momentum = 0.1
    model.eval()


def weights_digest(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (which teacher a saved measurement belongs to)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RaceLog:
    """The measurements of one time-to-quality race in a JSON file, rewritten atomically after each one.

    A rerun with the same settings (``key``: net, batch, steps, seed, device, threads, the teacher's digest,
    torch) reads them back instead of running them again, so a race of hours survives being stopped; each
    measurement keeps the commit and the time it was taken at. A file of other settings is moved aside
    (``.stale``), never mixed in."""

    def __init__(self, path, key: dict) -> None:
        self.path = Path(path)
        self.key = key
        self.data = {"key": key, "entries": {}}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("key") == key:
                self.data = old
                print(f"  resuming from {self.path} ({len(old['entries'])} measurements)", flush=True)
            else:
                stale = self.path.with_suffix(".stale.json")
                os.replace(self.path, stale)
                print(f"  {self.path} holds another race's settings: moved to {stale}", flush=True)

    def get(self, name: str):
        return self.data["entries"].get(name)

    def put(self, name: str, value) -> None:
        from exml_fast._utils.io import atomic_write
        from exml_fast._utils.provenance import git_commit

        self.data["entries"][name] = {**value, "commit": git_commit(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        text = json.dumps(self.data, indent=1).encode()
        atomic_write(self.path, lambda f: f.write(text))


def peer_trajectory(teacher: nn.Module, name: str, y: torch.Tensor, steps: int, every: int, seed: int,
                    device: str, *, bn_weight: float = BN_WEIGHT, peer: nn.Module | None = None,
                    use_amp: bool = False) -> list[dict]:
    """One call of the frozen peer for ``steps`` steps, its best batch so far measured (clean_quality) after
    every ``every`` steps and the last: ``[{"steps", "wall_s", "agreement", "bn"}]``.

    The public loop's constant step size and its draws from the seed make a call of k steps the first k
    steps of a longer one, so the best batch after step k is, bit for bit, what a k-step call returns
    (``test_best_callback_sees_what_a_shorter_call_returns``); ``wall_s`` is the time from the call's start
    to the end of step k with the measurements' own time taken out. One run instead of one call per probe:
    the peer's 2000 steps at batch 256 are hours for a ResNet on a 2-core CPU. ``peer``: the network the loop
    runs (default: a frozen copy of ``teacher``; the best peer's is compiled, and warmed up by the caller);
    ``use_amp``: the loop's bf16 autocast. The batches are measured on ``teacher`` either way."""
    peer_teacher = peer if peer is not None else public_teacher(teacher)
    points: list[dict] = []
    paused = 0.0

    def snap(it: int, best: torch.Tensor) -> None:
        nonlocal paused
        k = it + 1
        if k % every and k != steps:
            return
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        agree, bn = clean_quality(teacher, best, y)
        points.append({"steps": k, "wall_s": now - t0 - paused, "agreement": agree, "bn": bn})
        print(f"    peer step {k}: {points[-1]['wall_s']:.1f} s, agreement {agree:.0%}, BN term {bn:.4f}",
              flush=True)
        paused += time.perf_counter() - now

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    public_deepinversion(peer_teacher, y, iterations=steps, lr=LR, bn_reg_scale=bn_weight, tv_l2_scale=TV_L2_WEIGHT,
                         l2_scale=L2_WEIGHT, jitter=JITTER, flip=FLIP, generator=seed, input_shape=SHAPES[name],
                         all_bn=True, best_callback=snap, use_amp=use_amp)
    return points


def time_to_quality(teacher, info: dict, name: str, args) -> dict:
    """Seconds until a call returns a batch as good as the frozen peer's after --ttq-steps steps.

    Quality is measured on the returned batch itself (clean_quality: no augmentation), the same way for both
    sides. The bar: the BN term of the peer's batch after N = --ttq-steps steps, and >= 95 % agreement. The
    peer's time to quality is read off one N-step run (peer_trajectory: its best batch every N/40 steps); the
    engine's is the wall time of the shortest whole call (iterations on a grid of N/40 steps, found by
    smallest_steps: the engine's cosine step size depends on the call's length, so no run is the prefix of
    another) whose returned batch meets the bar; the engine may run up to --ttq-cap x N steps. Every
    measurement goes to a RaceLog under --ttq-state, so a stopped race resumes where it was.

    With --ttq-best the best forms race too, to the same bar: the best peer (public_teacher with bf16
    autocast, channels_last and torch.compile, compiled by a warm-up call before its clock starts) followed
    along its own N steps, and the engine's best form (exml_best_forms) searched as above.
    """
    b, d, n, seed = args.batch_of[name], args.device, args.ttq_steps, args.seeds[0]
    y = targets_for(b, d)
    grid_step = max(1, n // 40)
    bn_weight = race_bn_weight(teacher, name, args.ttq_bn_weight)
    key = {"net": name, "batch": b, "steps": n, "seed": seed, "device": d, "threads": torch.get_num_threads(),
           "teacher": weights_digest(teacher), "bn_weight": bn_weight, "torch": torch.__version__}
    log = RaceLog(Path(args.ttq_state) / f"ttq_{d}_{name}_b{b}_n{n}_s{seed}.json", key)

    if log.get("peer") is None:
        print(f"  time to quality: the peer, {n} steps at batch {b}, measured every {grid_step}", flush=True)
        log.put("peer", {"points": peer_trajectory(teacher, name, y, n, grid_step, seed, d, bn_weight=bn_weight)})
    points = log.get("peer")["points"]
    last = points[-1]
    bar, peer_agree = last["bn"], last["agreement"]
    out = {"peer_steps": n, "batch": b, "bn_bar": bar, "peer_agreement": peer_agree, "peer_wall_s": last["wall_s"],
           "grid_step": grid_step, "engine": [], "peer_points": points, "bn_weight": bn_weight,
           "rel_tol": args.ttq_rel_tol, **info}
    print(f"  time to quality: the peer's batch after {n} steps ({last['wall_s']:.1f} s): agreement "
          f"{peer_agree:.0%}, BN term {bar:.4f} (clean forward)", flush=True)
    if peer_agree < AGREEMENT:
        out.update(peer_reach_step=None, peer_reach_s=None)
        print(f"  the peer's own batch is under {AGREEMENT:.0%} agreement: no bar", flush=True)
        return out

    def meets(agree: float, bn: float) -> bool:
        return agree >= AGREEMENT and bn <= bar

    reach = next(p for p in points if meets(p["agreement"], p["bn"]))  # the last point meets it at least
    out.update(peer_reach_step=reach["steps"], peer_reach_s=reach["wall_s"])
    print(f"  peer: {reach['steps']} steps, {reach['wall_s']:.1f} s", flush=True)
    variants = ttq_variants(name, all_variants=args.ttq_all_variants)[:args.ttq_variants]
    out["engine"] = race_engine(teacher, name, variants, {"precision": "fp32"}, "", log, meets, reach["wall_s"],
                                args)
    if args.ttq_best:
        out["best"] = best_race(teacher, name, variants, log, meets, reach["wall_s"], args)
    return out


def race_engine(teacher, name: str, variants: list[tuple[str, dict]], form: dict, form_label: str, log: RaceLog,
                meets, peer_s: float, args) -> list[dict]:
    """The engine's side of a race: for each of ``variants`` (label, options) in ``form`` (precision and the
    like), the shortest call that ``meets`` the bar (smallest_steps over a grid of N/40 steps), each probe
    read from or written to ``log``; the speed-up against a peer that took ``peer_s``."""
    b, d, n, seed = args.batch_of[name], args.device, args.ttq_steps, args.seeds[0]
    y = targets_for(b, d)
    grid_step = max(1, n // 40)
    bn_weight = log.key["bn_weight"]
    rows = []
    for label, options in variants:
        label = f"{label} [{form_label}]" if form_label else label
        # warn_below=None: the short probes are meant to fall short; quality is measured here.
        synth = exml_synth(teacher, name, d, bn_weight=bn_weight, warn_below=None, **form, **options)
        if d == "cuda":  # the first call's one-off costs (kernel selection, allocator) are no step's
            synth.synthesize(b, iterations=min(grid_step, 10), batch_size=b, generator=seed + 1, progress=False)

        def measure(k: int, label=label, synth=synth) -> dict:
            entry = f"{label} | {k}"
            got = log.get(entry)
            if got is None:
                holder = {}

                def call():
                    holder["x"] = synth.synthesize(b, iterations=k, batch_size=b, generator=seed, progress=False).x
                wall = timed_call(call, d)
                agree, bn = clean_quality(teacher, holder["x"], y)
                log.put(entry, {"steps": k, "wall_s": wall, "agreement": agree, "bn": bn})
                got = log.get(entry)
                print(f"    {label}, {k} steps: {wall:.1f} s, agreement {agree:.0%}, BN term {bn:.4f}", flush=True)
            return {"steps": k, "wall_s": got["wall_s"], "agreement": got["agreement"], "bn": got["bn"],
                    "meets": meets(got["agreement"], got["bn"])}

        grid_e = list(range(grid_step, args.ttq_cap * n + 1, grid_step))
        e_steps, e_wall, e_probes = smallest_steps(measure, grid_e, rel_tol=args.ttq_rel_tol)
        row = {"variant": label, "options": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in {**form, **options}.items()},
               "steps": e_steps, "reached": e_steps is not None, "wall_s": e_wall, "probes": e_probes,
               "speedup": (peer_s / e_wall) if e_steps is not None else None}
        rows.append(row)
        print(f"  {label:>28}: " + (f"{e_steps} steps, {e_wall:.1f} s -> x{row['speedup']:.2f} vs the peer"
                                     if e_steps is not None else f"NOT reached in {grid_e[-1]} steps"), flush=True)
    return rows


def best_race(teacher, name: str, variants: list[tuple[str, dict]], log: RaceLog, meets, fp32_peer_s: float,
              args) -> dict:
    """The race of the best forms to the fp32 peer's bar: the best peer's own trajectory (compiled first,
    off the clock) and the engine's best form against it (and, for the record, against the fp32 peer)."""
    b, d, n, seed = args.batch_of[name], args.device, args.ttq_steps, args.seeds[0]
    y = targets_for(b, d)
    grid_step = max(1, n // 40)
    mode = args.best_mode_of.get(name) or (args.compile_modes[0] if args.compile_modes else None)
    label = public_best_label(mode)
    entry = f"peer best | {label}"
    if log.get(entry) is None:
        peer = public_teacher(teacher, channels_last=True, compile_mode=mode)
        t0 = time.perf_counter()
        public_deepinversion(peer, y, iterations=5, lr=LR, bn_reg_scale=log.key["bn_weight"],
                             tv_l2_scale=TV_L2_WEIGHT, l2_scale=L2_WEIGHT, jitter=JITTER, flip=FLIP,
                             generator=seed + 1, input_shape=SHAPES[name], all_bn=True, use_amp=True)
        print(f"  time to quality: the best peer ({label}) compiled in {time.perf_counter() - t0:.1f} s; "
              f"{n} steps, measured every {grid_step}", flush=True)
        log.put(entry, {"points": peer_trajectory(teacher, name, y, n, grid_step, seed, d,
                                                  bn_weight=log.key["bn_weight"], peer=peer, use_amp=True)})
    points = log.get(entry)["points"]
    reach = next((p for p in points if meets(p["agreement"], p["bn"])), None)
    out = {"peer": label, "peer_points": points, "peer_reach_step": reach and reach["steps"],
           "peer_reach_s": reach and reach["wall_s"], "engine": []}
    print("  best peer: " + (f"{reach['steps']} steps, {reach['wall_s']:.1f} s" if reach else
                              f"not at the bar within its {n} steps"), flush=True)
    form_label, form = exml_best_forms(d)[0]
    rows = race_engine(teacher, name, variants, form, form_label.removeprefix("exml "), log, meets,
                       reach["wall_s"] if reach else float("nan"), args)
    for r in rows:
        r["speedup_vs_fp32_peer"] = fp32_peer_s / r["wall_s"] if r["reached"] else None
        if reach is None:
            r["speedup"] = None
    out["engine"] = rows
    return out


def race_bn_weight(teacher: nn.Module, name: str, choice: str | None) -> float:
    """The BN weight of the race's objective, the same on both sides: a number, or "auto" — the rule of
    DeepInversion's auto preset (ln K over the BN term of a batch of noise); None: the issue's 10 on
    LeNet-5-BN, "auto" on the ResNets. The 10 is the CIFAR recipe's; on the Fashion-MNIST ResNet-18 neither loop
    got past 22 % agreement under it (batches of 32 and 64, up to 700 steps: the term of 20 BN layers buries the
    cross-entropy), so their race runs at "auto"."""
    if choice is None:
        choice = "auto" if name.startswith("resnet") else str(BN_WEIGHT)
    if choice != "auto":
        return float(choice)
    from exml_fast.synth.presets import auto_bn_weight, bn_loss_of_noise

    noise, k = bn_loss_of_noise(teacher, SHAPES[name])
    return auto_bn_weight(noise, k)


def ttq_variants(name: str, *, all_variants: bool = False) -> list[tuple[str, dict]]:
    """The engine's settings raced against the peer: its optimiser unchanged (per-sample augmentation, the
    default), the same with the peer's one augmentation draw per batch, that with a cosine-decayed step size
    from lr 0.1 (the same objective; the peer's constant 0.05 leaves Adam's noise in the batch), and, on the
    ResNets (which pool globally; LeNet's fixed-size head cannot), that with multi-resolution (the first half
    of the steps at half the side).

    On the ResNets only the last two run unless ``all_variants``: at the peer's step size the engine needs
    about as many steps as the peer, and the search over whole calls costs several times the answer — a day
    of CPU at batch 256 for a row the LeNet race already answers (the per-step gain spent on steps)."""
    v = [("exml (peer's optimiser)", {}),
         ("exml, one draw per batch (the peer's augmentation)", {"augment_per": "batch"}),
         # Chosen on seed 1 (the race reports seed 0) among lr {0.05, 0.1} x {constant, cosine} x
         # {per-sample, per-batch} draws on LeNet-5-BN: the same objective, a cosine decay of the step size.
         ("exml, cosine lr 0.1, one draw per batch", {"augment_per": "batch", "schedule": "cosine", "lr": 0.1})]
    if name.startswith("resnet"):
        v.append(("exml, cosine lr 0.1, one draw per batch, multi-resolution",
                  {"augment_per": "batch", "schedule": "cosine", "lr": 0.1, "multi_resolution": (0.5, 0.5)}))
        if not all_variants:
            v = v[2:]
    return v


def conv_floor(name: str, batch: int, step_s: float) -> dict:
    """The floor of a step on ATen's kernels: every Conv2d and Linear layer of the network run alone, forward
    + input gradient (the weights frozen), on its own input shape, each in its fastest way — autograd in NCHW
    or channels_last, or, for stride-1 convolutions, the input gradient as a convolution with the flipped
    kernel (exml_fast's swap, exml_fast.synth.input_grad_conv) — timed and summed. No implementation of the
    step that calls these kernels goes under it; everything above it (BN, activations, pooling, the losses,
    the optimiser) is what a synthesis loop adds.

    Also: the FLOPs of those layers (FlopCounterMode, forward x 2) and the rate of a 2048-square fp32 matmul.
    The matmul is listed, not used: on the AMD CPUs here torch's sgemm ran below oneDNN's convolutions (both
    loops ran faster than the convolutions' FLOPs at the sgemm rate would allow), so it is no floor."""
    from torch.utils.flop_counter import FlopCounterMode

    from exml_fast.synth.input_grad_conv import conv2d_input_grad, flip_kernel

    model = NETS[name]().eval().requires_grad_(False)
    x = torch.randn(batch, *SHAPES[name])
    with FlopCounterMode(display=False) as fc:
        model(x)
    flops = 2 * fc.get_total_flops()
    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].shape)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for layer, shape in seen:
        formats = (torch.contiguous_format, torch.channels_last) if len(shape) == 4 else (torch.contiguous_format,)
        best = float("inf")
        for fmt in formats:
            mod = copy.deepcopy(layer).to(memory_format=fmt) if len(shape) == 4 else layer
            xi = torch.randn(shape).to(memory_format=fmt).requires_grad_(True)
            with torch.no_grad():
                g = torch.randn_like(mod(xi))

            def call(mod=mod, xi=xi, g=g):
                torch.autograd.grad(mod(xi), xi, g)

            calls = [call]
            if (isinstance(layer, nn.Conv2d) and layer.stride == (1, 1) and layer.dilation == (1, 1)
                    and layer.groups == 1 and isinstance(layer.padding, tuple)):
                flipped = flip_kernel(mod.weight)
                xd = xi.detach()

                def swap(mod=mod, xd=xd, g=g, flipped=flipped):
                    mod(xd)
                    conv2d_input_grad(g, mod.weight, mod.padding, flipped)

                calls.append(swap)
            for fn in calls:
                fn()
                best = min(best, true_median([timed_call(fn, "cpu") for _ in range(5)]))
        total += best
    m = 2048
    a, bm = torch.randn(m, m), torch.randn(m, m)
    a @ bm
    t = true_median([timed_call(lambda: a @ bm, "cpu") for _ in range(5)])
    return {"gflop_per_step": flops / 1e9, "gflop_per_image": flops / 1e9 / batch, "layers": len(seen),
            "floor_s": total, "conv_gflops": flops / total / 1e9, "sgemm_gflops": 2 * m**3 / t / 1e9,
            "fraction_of_floor": total / step_s}


def timing_rows(variants: dict[str, Variant], samples: dict[str, list[float]], failed: dict[str, str], batch: int,
                args) -> list[dict]:
    """One row per variant: its step's true median and range, images/s, and the median [min-max] of the
    per-round ratios against the fp32 peer ("speedup") and against its peer of the same precision
    (pair_with_peers)."""
    rows = []
    base = samples.get(PEER, [])
    for n, s in samples.items():
        v = variants[n]
        role = {"variant": n, "side": v.side, "form": v.form, "bn": v.bn, "config": v.config}
        if not s:
            rows.append({**role, "failed": failed[n]})
            continue
        if min(s) <= 0:  # the longer call was not slower: no figure, rather than a clamped absurd one
            rows.append({**role, "samples_s": s, "failed": (
                f"t(K2 = {args.k2}) <= t(K1 = {args.k1}) in {sum(x <= 0 for x in s)} of {len(s)} rounds: "
                f"{args.k2 - args.k1} iterations are below the timing noise; raise --k2")})
            print(f"  {n:>24}: no figure ({rows[-1]['failed']})", flush=True)
            continue
        # No ratio against a peer without a figure of its own (failed, or below the noise).
        ratios = [b / x for b, x in zip(base, s)] if base and min(base) > 0 else [float("nan")]
        step = true_median(s)
        rows.append({**role, "s_per_iter": step, "s_min": min(s), "s_max": max(s), "rounds": len(s),
                     "images_per_s": batch / step, "speedup": true_median(ratios), "speedup_min": min(ratios),
                     "speedup_max": max(ratios), "samples_s": s})
        print(f"  {n:>24}: {step * 1e3:8.1f} ms/it [{min(s) * 1e3:.1f}-{max(s) * 1e3:.1f}]  "
              f"{batch / step:8.1f} img/s  x{true_median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
              f"vs {PEER}", flush=True)
    pair_with_peers(rows, samples)
    return rows


def pair_with_peers(rows: list[dict], samples: dict[str, list[float]]) -> None:
    """Marks each side's fastest best form ("best": True) and gives every timed row with the BN term (but the
    fp32 peer) its peer of the same precision and the median [min-max] of the per-round ratios against it:
    an fp32 row against the fp32 peer; the engine's best forms against the best peer; the public best forms
    against the fp32 peer (what the careful user's configuration buys)."""
    timed = [r for r in rows if "s_per_iter" in r]
    for side in ("public", "exml"):
        best = [r for r in timed if r["side"] == side and r["form"] == "best" and r["bn"]]
        if best:
            min(best, key=lambda r: r["s_per_iter"])["best"] = True
    fp32_peer = next((r for r in timed if r["variant"] == PEER), None)
    best_peer = next((r for r in timed if r.get("best") and r["side"] == "public"), None)
    for r in timed:
        if not r["bn"] or r is fp32_peer or r["form"] == "listed":
            continue
        peer = best_peer if (r["side"], r["form"]) == ("exml", "best") else fp32_peer
        if peer is None:
            continue
        ratios = [a / b for a, b in zip(samples[peer["variant"]], samples[r["variant"]])]
        r.update(peer=peer["variant"], speedup_vs_peer=true_median(ratios), speedup_vs_peer_min=min(ratios),
                 speedup_vs_peer_max=max(ratios))


def bn_shares(rows: list[dict], samples: dict[str, list[float]]) -> list[dict]:
    """The BN term's cost in each loop timed with and without it (same-round pairs): what it adds (median
    [min-max] of with / without - 1) and its share of the step with it (1 - median of without / with)."""
    out = []
    timed = {r["variant"]: r for r in rows if "s_per_iter" in r}
    for name, r in timed.items():
        if r["bn"] or name.removesuffix(NO_BN) not in timed:
            continue
        with_bn = name.removesuffix(NO_BN)
        ratios = [w / wo for w, wo in zip(samples[with_bn], samples[name])]
        out.append({"variant": with_bn, "with_ms": timed[with_bn]["s_per_iter"] * 1e3,
                    "without_ms": r["s_per_iter"] * 1e3, "adds_pct": 100 * (true_median(ratios) - 1),
                    "adds_pct_min": 100 * (min(ratios) - 1), "adds_pct_max": 100 * (max(ratios) - 1),
                    "share_pct": 100 * (1 - true_median([1 / x for x in ratios])), "rounds": len(ratios)})
        print(f"  the BN term in {with_bn}: adds {out[-1]['adds_pct']:.1f} % [{out[-1]['adds_pct_min']:.1f}-"
              f"{out[-1]['adds_pct_max']:.1f}], {out[-1]['share_pct']:.1f} % of its step", flush=True)
    return out


def best_peer_mode(rows: list[dict]) -> str | None:
    """The compile mode of the fastest public best form in ``rows`` (None: none timed, or eager)."""
    r = next((r for r in rows if r.get("best") and r["side"] == "public"), None)
    if r is None or "+compile(" not in r["variant"]:
        return None
    return r["variant"].split("+compile(", 1)[1].rstrip(")")


def bench_net(name: str, args) -> dict:
    batch = args.batch_of[name]
    print(f"{name}, batch {batch}, {'x'.join(map(str, SHAPES[name][1:]))} — " + (
        "time to quality" if args.ttq_only else f"timing (K1={args.k1}, K2={args.k2}, {args.rounds} rounds)"),
        flush=True)
    torch._dynamo.reset()  # each net's compiled peers start from an empty cache (ResNet-18 and -34 share code)
    teacher = calibrated_teacher(name, args.device)
    if args.ttq_only:
        ttq = time_to_quality(*ttq_teacher(name, args.device, args.ttq_state, teacher), name, args)
        print(flush=True)
        return {"net": name, "batch": batch, "timing": [], "floor": None, "check": [], "ttq": ttq}
    variants = variants_for(teacher, name, args)
    samples, failed = time_steps(variants, args)
    rows = timing_rows(variants, samples, failed, batch, args)
    shares = bn_shares(rows, samples)
    mode = best_peer_mode(rows)
    if mode is not None:
        args.best_mode_of[name] = mode
    step_s = {r["variant"]: r["s_per_iter"] for r in rows if "s_per_iter" in r}
    floor = conv_floor(name, batch, step_s["exml fp32"]) if "exml fp32" in step_s and args.device == "cpu" else None
    if floor:
        print(f"  floor: the {floor['layers']} conv/linear layers alone (forward + input gradient) "
              f"{floor['floor_s'] * 1e3:.1f} ms/step = {floor['conv_gflops']:.0f} GFLOP/s "
              f"(sgemm {floor['sgemm_gflops']:.0f} GFLOP/s): {floor['fraction_of_floor']:.0%} of exml's step",
              flush=True)

    check = []
    if args.check_iterations > 0:
        print(f"  equal-loss check: {args.check_iterations} iterations, seeds {args.seeds}",
              flush=True)
        for n, v in variants.items():
            # the public loop compiled, as shipped or without its BN term: the same loop as the peer's
            if n in failed or v.form == "listed" or not v.bn or (v.side == "public" and n != PEER):
                continue
            finals = [v.run(args.check_iterations, s) for s in args.seeds]
            check.append({"variant": n, "final_losses": finals})
            print(f"  {n:>24}: final loss " + ", ".join(f"{f:.4f}" for f in finals), flush=True)
        ref = check[0]["final_losses"]
        noise = statistics.pstdev(ref) if len(ref) > 1 else 0.0
        for c in check:
            diff = abs(statistics.fmean(c["final_losses"]) - statistics.fmean(ref))
            tol = max(3 * noise, 0.02 * abs(statistics.fmean(ref)))
            c.update(diff=diff, tolerance=tol, within_noise=diff <= tol)
            if c["variant"] != check[0]["variant"]:
                print(f"  {c['variant']:>24}: |mean diff| {diff:.4f} vs tolerance {tol:.4f} -> "
                      f"{'equal within noise' if c['within_noise'] else 'DIFFERENT'}", flush=True)
    ttq = (time_to_quality(*ttq_teacher(name, args.device, args.ttq_state, teacher), name, args)
           if args.ttq_steps > 0 and not args.port_only else None)
    gen = (bench_generator(teacher, name, args) if args.generator_fit > 0 and not args.port_only else None)
    print(flush=True)
    return {"net": name, "batch": batch, "timing": rows, "bn_share": shares, "best_peer_mode": mode, "floor": floor,
            "check": check, "ttq": ttq, "generator": gen}


def bench_generator(teacher: nn.Module, name: str, args) -> dict:
    """A trained generator's images/s against DeepInversion's, both at >= AGREEMENT teacher agreement.

    The generator (GenerativeSynthesizer, preset skd, --generator-arch) is fitted for --generator-fit steps
    of the net's batch (a one-off cost, timed); then class-balanced batches of 4x the batch are drawn (the
    teacher labels every kept draw, so agreement is 1 by construction; the rejected draws are in the time).
    DeepInversion (the engine, exml fp32) runs --generator-di-steps steps on one batch, doubled (up to 8x)
    until the returned batch reaches the agreement bar; its images/s is the batch over that call's wall time.
    Break-even: the images after which fit + sampling is cheaper than DeepInversion.
    """
    from exml_fast.synth import GenerativeSynthesizer

    batch, dev = args.batch_of[name], args.device
    print(f"  trained generator ({args.generator_arch}, preset skd): fit {args.generator_fit} steps of {batch}",
          flush=True)
    synth = GenerativeSynthesizer(copy.deepcopy(teacher), input_shape=SHAPES[name], mean=None, std=None,
                                  num_classes=10, device=dev, preset="skd", generator_arch=args.generator_arch)
    t0 = time.perf_counter()
    synth.fit(args.generator_fit, batch_size=batch, generator=0, progress=False)
    fit_s = time.perf_counter() - t0
    n = 4 * batch
    out = {"arch": args.generator_arch, "fit_steps": args.generator_fit, "fit_s": fit_s, "n": n}
    try:
        synth.synthesize(batch, classes=range(10), generator=1, progress=False)  # warm-up
        walls, agree, accept = [], [], []
        for r in range(args.rounds):
            got = []
            walls.append(timed_call(lambda r=r: got.append(synth.synthesize(n, classes=range(10), generator=2 + r,
                                                                             progress=False)), dev))
            b = got[0]
            agree.append(clean_quality(teacher, b.x, b.y)[0])
            accept.append(float(b.losses["acceptance"].mean()))
    except RuntimeError as err:  # the teacher never labels some class as such: no balanced batch
        out["failed"] = str(err)
        print(f"    sampling failed: {err}", flush=True)
        return out
    out.update(images_per_s=n / true_median(walls), agreement=min(agree), acceptance=true_median(accept))
    di = exml_synth(teacher, name, dev, precision="fp32")
    steps = args.generator_di_steps
    for attempt in range(4):  # double DeepInversion's steps until its batch reaches the agreement bar
        got = []
        di_wall = timed_call(lambda: got.append(di.synthesize(batch, iterations=steps, batch_size=batch,
                                                              generator=0, progress=False)), dev)
        di_agreement = clean_quality(teacher, got[0].x, got[0].y)[0]
        print(f"    DeepInversion {steps} steps: {batch / di_wall:.1f} img/s, agreement {di_agreement:.0%}",
              flush=True)
        if di_agreement >= AGREEMENT or attempt == 3:
            break
        steps *= 2
    out.update(di_steps=steps, di_images_per_s=batch / di_wall, di_agreement=di_agreement)
    gain = 1 / out["di_images_per_s"] - 1 / out["images_per_s"]
    out["break_even_images"] = fit_s / gain if gain > 0 else None
    print(f"    generator: fit {fit_s:.1f} s, {out['images_per_s']:.0f} img/s (agreement {out['agreement']:.0%}, "
          f"acceptance {out['acceptance']:.0%}); DeepInversion {out['di_steps']} steps: "
          f"{out['di_images_per_s']:.1f} img/s (agreement {out['di_agreement']:.0%}); break-even after "
          f"{out['break_even_images'] or float('nan'):.0f} images", flush=True)
    return out


def to_markdown(rec: dict) -> str:
    a = rec["args"]
    cmd = rec.get("command") or " ".join(["python benches/bench_synthesis.py", *rec["argv"]])
    lines = env_markdown(rec["env"], "synthesis (DeepInversion)", cmd)
    lines += ["Objective: CE + 10·R_BN (l2, no first-layer multiplier) + 2.5e-5·TV-l2, Adam lr 0.05 constant, "
              "2-px roll, no flips, no clip. Step cost = (t(K2) - t(K1)) / (K2 - K1) of whole synthesis calls, "
              f"K1 = {a['k1']}, K2 = {a['k2']}, {a['rounds']} interleaved rounds; speed-up = median of per-round "
              f"ratios [min-max] against **{PEER}** (the public loop with the teacher's parameters frozen)."
              + (" \"public as shipped\" computes weight gradients nobody uses: listed, not a peer."
                 if not a.get("best") else
                 " Precision with precision: exml fp32 against public frozen (fp32 eager); the engine's fastest "
                 "best form against the fastest public best form (bf16 autocast, channels_last, torch.compile "
                 f"modes {', '.join(a.get('compile_modes') or []) or 'none: eager'})."), ""]
    for net in rec["results"]:
        lines += [f"## {net['net']}, batch {net['batch']}", ""]
        if net["timing"]:
            lines += [f"| variant | ms / iteration | images / s | speed-up vs {PEER} | min–max ms | form | "
                      "speed-up vs its peer (same precision) |", "|---|---:|---:|---:|---|---|---|"]
        for r in net["timing"]:
            if "failed" in r:
                lines.append(f"| {r['variant']} | failed: {r['failed'][:80]} | | | | | |")
                continue
            form = r.get("form", "") + (" (fastest)" if r.get("best") else "")
            vs_peer = (f"{r['speedup_vs_peer']:.2f}x [{r['speedup_vs_peer_min']:.2f}-{r['speedup_vs_peer_max']:.2f}] "
                       f"vs {r['peer']}" if r.get("peer") else "—")
            lines.append(f"| {r['variant']} | {r['s_per_iter'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                         f"{r['speedup']:.2f}x [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] | "
                         f"{r['s_min'] * 1e3:.1f}–{r['s_max'] * 1e3:.1f} | {form} | {vs_peer} |")
        lines += _pairs_text(net)
        f = net.get("floor")
        if f:
            lines += ["", f"Floor: the network's {f['layers']} convolution and linear layers run alone, forward + "
                      "input gradient, each on its own input shape in its fastest way (NCHW or channels_last "
                      "autograd, or the input gradient as a flipped-kernel convolution): "
                      f"{f['floor_s'] * 1e3:.1f} ms per step ({f['gflop_per_image']:.3g} GFLOP per image, "
                      f"{f['conv_gflops']:.0f} GFLOP/s): {f['fraction_of_floor']:.0%} of exml fp32's step. "
                      f"A 2048-square fp32 matmul runs at {f['sgemm_gflops']:.0f} GFLOP/s here"
                      + (", below the convolutions' rate, so the FLOPs at the GEMM rate would be no floor."
                         if f["sgemm_gflops"] < f["conv_gflops"] else ".")]
        if net["check"]:
            lines += ["", f"Final loss after {a['check_iterations']} iterations, seeds {a['seeds']}:", "",
                      "| variant | final losses | abs. mean diff | tolerance | equal |",
                      "|---|---|---:|---:|---|"]
            for c in net["check"]:
                lines.append(f"| {c['variant']} | {', '.join(f'{v:.4f}' for v in c['final_losses'])} | "
                             f"{c['diff']:.4f} | {c['tolerance']:.4f} | "
                             f"{'yes' if c['within_noise'] else 'NO'} |")
        q = net.get("ttq")
        if q:
            lines += ["", f"Time to quality (batch {q['batch']}; teacher: {q['teacher']}; the objective above with "
                      f"BN weight {q['bn_weight']:.4g} on both sides): the peer's batch after "
                      f"{q['peer_steps']} steps ({q['peer_wall_s']:.1f} s) has BN term {q['bn_bar']:.4f} at "
                      f"{q['peer_agreement']:.0%} agreement (one clean forward of the returned batch). Bar: BN term "
                      f"<= that and >= {AGREEMENT:.0%} agreement, measured the same way on each side's returned "
                      f"batch. The peer's time: its best batch followed along that one run every {q['grid_step']} "
                      "steps (a call of k steps returns exactly the batch it has after step k; the measuring "
                      "paused the clock). The engine's: the wall time of the shortest whole call (steps on a grid "
                      f"of {q['grid_step']}, galloping search and bisection"
                      + (f" to within {q['rel_tol']:.0%}, so its figure errs towards the engine being slower"
                         if q["rel_tol"] else "") + ") whose batch meets it.", ""]
            if q.get("peer_reach_step") is not None:
                lines += ["| loop | steps to the bar | seconds | speed-up vs the peer |", "|---|---:|---:|---:|",
                          f"| {PEER} (peer) | {q['peer_reach_step']} | {q['peer_reach_s']:.1f} | 1.00x |"]
                for r in q["engine"]:
                    if r["reached"]:
                        lines.append(f"| {r['variant']} | {r['steps']} | {r['wall_s']:.1f} | "
                                     f"**{r['speedup']:.2f}x** |")
                    else:
                        lines.append(f"| {r['variant']} | not within {r['probes'][-1]['steps']} | — | — |")
                lines += ["", "Every probe (steps: seconds, agreement, BN term; * meets the bar):", ""]
                peer_pts = [p for p in q["peer_points"] if p["steps"] % (4 * q["grid_step"]) == 0
                            or p["steps"] == q["peer_reach_step"]]
                lines.append(f"- {PEER} (every {4 * q['grid_step']} steps of its run): " + ", ".join(
                    _probe_text(p, p["agreement"] >= AGREEMENT and p["bn"] <= q["bn_bar"]) for p in peer_pts))
                for r in q["engine"]:
                    lines.append(f"- {r['variant']}: " + ", ".join(
                        _probe_text(p, p["meets"]) for p in sorted(r["probes"], key=lambda p: p["steps"])))
                lines += _best_race_text(q)
        g = net.get("generator")
        if g:
            lines += ["", f"Trained generator (`GenerativeSynthesizer`, preset skd, `{g['arch']}`): fitted "
                      f"{g['fit_steps']} steps of {net['batch']} in {g['fit_s']:.1f} s, then class-balanced "
                      f"batches of {g['n']} drawn (the teacher labels each kept draw; rejected draws are in the "
                      "time). DeepInversion: the engine, one call on one batch.", ""]
            if "failed" in g:
                lines.append(f"Sampling failed: {g['failed']}")
            else:
                be = g["break_even_images"]
                lines += ["| synthesis | images / s | teacher agreement | one-off cost |", "|---|---:|---:|---:|",
                          f"| trained generator (acceptance {g['acceptance']:.0%}) | {g['images_per_s']:.0f} | "
                          f"{g['agreement']:.0%} | fit {g['fit_s']:.1f} s |",
                          f"| DeepInversion, {g['di_steps']} steps | {g['di_images_per_s']:.1f} | "
                          f"{g['di_agreement']:.0%} | — |", "",
                          f"Sampling is {g['images_per_s'] / g['di_images_per_s']:.0f}x DeepInversion's rate; "
                          + (f"fit + sampling is cheaper beyond {be:.0f} images." if be is not None else
                             "sampling is not faster, so the fit never pays off.")]
        lines.append("")
    return "\n".join(lines)


def _pairs_text(net: dict) -> list[str]:
    """The headline ratios (precision with precision), what each variant runs, and the BN term's share."""
    timed = [r for r in net["timing"] if "s_per_iter" in r]
    lines = []
    heads = [f"**{r['variant']}** vs {r['peer']}: **{r['speedup_vs_peer']:.2f}x** [{r['speedup_vs_peer_min']:.2f}–"
             f"{r['speedup_vs_peer_max']:.2f}]" for r in timed
             if r.get("peer") and r["side"] == "exml" and (r["form"] == "fp32" or r.get("best"))]
    if heads:
        lines += ["", "Precision with precision: " + "; ".join(heads) + "."]
    if any(r.get("config") for r in timed):
        lines += ["", "What each variant runs:", ""]
        lines += [f"- {r['variant']}: {r['config']}" for r in timed if r.get("config")]
    if net.get("bn_share"):
        lines += ["", "The BN term's cost (each loop with and without it, same-round pairs):", "",
                  "| loop | ms / iteration with it | without | it adds [min–max] | its share of the step |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {b['variant']} | {b['with_ms']:.2f} | {b['without_ms']:.2f} | {b['adds_pct']:.1f} % "
                  f"[{b['adds_pct_min']:.1f}–{b['adds_pct_max']:.1f}] | {b['share_pct']:.1f} % |"
                  for b in net["bn_share"]]
    return lines


def _best_race_text(q: dict) -> list[str]:
    """The race of the best forms (bench's time_to_quality with --ttq-best), to the fp32 peer's bar."""
    best = q.get("best")
    if not best:
        return []
    reach = best["peer_reach_step"]
    lines = ["", f"The best forms, to the same bar: the best peer ({best['peer']}, compiled before its clock "
             "started) followed along its own run; the engine's best form searched as above.", "",
             "| loop | steps to the bar | seconds | speed-up vs the best peer | vs the fp32 peer |",
             "|---|---:|---:|---:|---:|",
             f"| {best['peer']} (best peer) | " + (
                 f"{reach} | {best['peer_reach_s']:.1f} | 1.00x | {q['peer_reach_s'] / best['peer_reach_s']:.2f}x |"
                 if reach is not None else f"not within {q['peer_steps']} | — | — | — |")]
    for r in best["engine"]:
        if r["reached"]:
            vs_best = f"**{r['speedup']:.2f}x**" if r["speedup"] is not None else "—"
            lines.append(f"| {r['variant']} | {r['steps']} | {r['wall_s']:.1f} | {vs_best} | "
                         f"{r['speedup_vs_fp32_peer']:.2f}x |")
        else:
            lines.append(f"| {r['variant']} | not within {r['probes'][-1]['steps']} | — | — | — |")
    lines += ["", f"- {best['peer']}: " + ", ".join(
        _probe_text(p, p["agreement"] >= AGREEMENT and p["bn"] <= q["bn_bar"]) for p in best["peer_points"]
        if p["steps"] % (4 * q["grid_step"]) == 0 or p["steps"] == reach)]
    for r in best["engine"]:
        lines.append(f"- {r['variant']}: " + ", ".join(
            _probe_text(p, p["meets"]) for p in sorted(r["probes"], key=lambda p: p["steps"])))
    return lines


def _probe_text(p: dict, meets: bool) -> str:
    return f"{p['steps']}: {p['wall_s']:.1f} s, {p['agreement']:.0%}, {p['bn']:.4f}" + (" *" if meets else "")


def main(argv=None) -> None:
    p = op_parser(__doc__, quick_help="batch 64, K2 = K1 + 2 (CUDA: K1 + 20), 2 rounds, 5 check iterations")
    p.add_argument("--nets", nargs="+", default=DEFAULT_NETS, choices=list(NETS))
    p.add_argument("--batch", type=int, default=None,
                   help="default: CPU 64 for the ResNets, 256 for LeNet-5-BN; CUDA 256, ResNet-50 64 "
                        "(64 with --quick)")
    p.add_argument("--best", action=argparse.BooleanOptionalAction, default=None,
                   help="also time each side's best form (bf16, channels_last, torch.compile / CUDA graph) and "
                        "compare precision with precision (default: on a GPU)")
    p.add_argument("--compile-modes", nargs="+", default=None,
                   help="torch.compile modes of the public best forms, the faster kept (default: CUDA "
                        "max-autotune reduce-overhead, CPU default; none with --no-compile)")
    p.add_argument("--exml-compile", action="store_true",
                   help="also the engine's best form with compile=True (its loss under torch.compile)")
    p.add_argument("--bn-share", action="store_true",
                   help="also each side's step without the BN term: the term's share of a step")
    p.add_argument("--k1", type=int, default=None,
                   help="iterations of the short call (default: CPU 1, CUDA 5 — past the "
                        "engine's 3 eager warm-up steps and its graph capture)")
    p.add_argument("--k2", type=int, default=None,
                   help="iterations of the long call (default: CPU 4, CUDA 105; --quick: K1 + 2, CUDA K1 + 20)")
    p.add_argument("--rounds", type=int, default=None, help="default: CPU 3, CUDA 5; --quick 2")
    p.add_argument("--check-iterations", type=int, default=None,
                   help="iterations of the equal-loss check (default: CPU 20, CUDA 200; "
                        "--quick 5; 0 skips it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="seeds of the equal-loss check (their spread is the noise)")
    p.add_argument("--port-only", action="store_true",
                   help="time only the public loop port (no exml_fast.synth)")
    p.add_argument("--ttq-steps", type=int, default=None,
                   help="the peer's steps in the time-to-quality race (default: CPU 200, CUDA 2000, --quick 0; "
                        "0 skips it)")
    p.add_argument("--ttq-only", action="store_true",
                   help="only the time-to-quality race (no per-step timing, no loss check)")
    p.add_argument("--ttq-cap", type=int, default=3,
                   help="the engine may run up to this many times the peer's steps before it is called short")
    p.add_argument("--ttq-best", action=argparse.BooleanOptionalAction, default=None,
                   help="race the best forms too, to the fp32 peer's bar (default: with --best)")
    p.add_argument("--ttq-variants", type=int, default=None,
                   help="race only the first N of the engine's settings (default: all)")
    p.add_argument("--ttq-all-variants", action="store_true",
                   help="on the ResNets, also race the engine at the peer's step size (hours more on a CPU)")
    p.add_argument("--ttq-bn-weight", default=None,
                   help="BN weight of the race's objective, both sides: a number or 'auto' (DeepInversion's auto "
                        "rule on the teacher); default: the issue's 10 on LeNet-5-BN, 'auto' on the ResNets "
                        "(under 10 neither loop got past 22 %% agreement on the Fashion-MNIST ResNet-18)")
    p.add_argument("--ttq-rel-tol", type=float, default=0.0,
                   help="stop the engine's bisection within this fraction of its answer (default 0: one grid "
                        "step); the figure then errs towards the engine being slower")
    p.add_argument("--ttq-state", default=str(TTQ_STATE),
                   help="folder of the race's measurements and trained teachers, read back by a rerun "
                        "(default: runs/bench_synthesis)")
    p.add_argument("--generator-fit", type=int, default=0,
                   help="fit steps of the trained generator compared with DeepInversion per net (default: 0, off; "
                        "recorded with --nets lenet5_bn --generator-fit 200 --suffix _generator)")
    p.add_argument("--generator-arch", default="skd-narrow", help="the generator network (default: skd-narrow)")
    p.add_argument("--generator-di-steps", type=int, default=200,
                   help="DeepInversion's first step count in the comparison, doubled until its batch reaches "
                        "the agreement bar (default: 200)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if not args.port_only and not exml_fast.has_ops():
        p.error("exml_fast._C is not built: the engine would run its pure-PyTorch fallback")
    cuda = args.device == "cuda"
    args.batch_of = {n: (args.batch if args.batch is not None else
                         64 if args.quick else GPU_BATCH[n] if cuda else CPU_BATCH[n]) for n in NETS}
    if args.best is None:
        args.best = cuda
    if args.ttq_best is None:
        args.ttq_best = args.best
    if args.compile_modes is None:
        args.compile_modes = ["max-autotune", "reduce-overhead"] if cuda else ["default"]
    if args.no_compile:
        args.compile_modes = []
    args.best_mode_of = {}  # net -> the compile mode of its fastest public best form (set by its timing)
    if args.k1 is None:
        args.k1 = 5 if cuda else 1
    if args.k2 is None:
        # On the GPU two iterations of a small net (a few ms) are within the noise of a call's fixed
        # cost: the quick run's difference spans 20 there.
        args.k2 = args.k1 + (20 if cuda else 2) if args.quick else (105 if cuda else 4)
    if args.rounds is None:
        args.rounds = 2 if args.quick else (5 if cuda else 3)
    if args.check_iterations is None:
        args.check_iterations = 5 if args.quick else (200 if cuda else 10)
    if args.ttq_steps is None:
        args.ttq_steps = 0 if args.quick else (2000 if cuda else 200)
    if args.ttq_bn_weight not in (None, "auto"):
        try:
            if float(args.ttq_bn_weight) < 0:
                raise ValueError
        except ValueError:
            p.error(f"--ttq-bn-weight: a number >= 0 or 'auto'; got {args.ttq_bn_weight!r}")
    if args.k2 <= args.k1 or args.k1 < 1:
        p.error(f"--k1/--k2: need 1 <= k1 < k2; got {args.k1}, {args.k2}")

    t0 = time.perf_counter()
    env = environment(args.device, "synthesis (DeepInversion)")
    results = [bench_net(n, args) for n in args.nets]
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "command": command_line("bench_synthesis.py", argv),
           "args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    suffix = ("_quick" if args.quick else "") + (args.suffix or "")
    record(args.out, f"synthesis_{args.device}{suffix}", rec, to_markdown(rec))


if __name__ == "__main__":
    main()
