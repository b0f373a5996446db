"""What the synthesis benchmarks share: their teachers, the two loops they time and the command line.

End-to-end DeepInversion synthesis speed: exml_fast.synth.DeepInversion against
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

The benchmarks, one script each (``bench_synthesis.py`` runs them together, as recorded):
  bench_synthesis_step.py       per-step cost of each loop (and the BN term's share, the convolutions' floor)
  bench_synthesis_loss.py       equal final loss of the loops from the same seeds
  bench_synthesis_ttq.py        time to quality: the wall time to a batch as good as the peer's
  bench_synthesis_generator.py  a trained generator's images/s against DeepInversion's
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys

import torch
from benchlib import ROOT, command_line, env_markdown, op_parser, record
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

# The objective timed (the measurement): the public script's "paper parameters" (lr 0.05, BN weight
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


def clean_quality(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(teacher agreement, BN term) of a returned batch: one eval forward of x itself, no augmentation, the BN
    term in the objective's form (l2, every BN layer, no first-layer multiplier)."""
    from exml_fast.synth.matcher import BNStatsMatcher

    teacher.eval()
    with BNStatsMatcher(teacher, form="l2", first_bn_multiplier=1.0) as bn, torch.no_grad():
        out = teacher(x)
        loss = float(bn.loss())
    return int((out.argmax(1) == y).sum()) / len(y), loss




#: Where the time-to-quality race keeps its measurements and trained teachers (bench_synthesis_ttq.py).
TTQ_STATE = ROOT / "runs" / "bench_synthesis"

# -- the command line the four benchmarks share ------------------------------------------------------------


def parser(doc: str, *, quick_help: str = "batch 64, K2 = K1 + 2 (CUDA: K1 + 20), 2 rounds, 5 check iterations"
           ) -> argparse.ArgumentParser:
    """The options of every synthesis benchmark (each script reads those of its part)."""
    p = op_parser(doc, quick_help=quick_help)
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
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and fill in the defaults that depend on the device and --quick; refuse a run that would mean
    nothing (no GPU for --device cuda, or no compiled library)."""
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

    return args


def write(args, argv, script: str, stem: str, results: list[dict], to_markdown, env: dict) -> dict:
    """Records a run as ``<out>/<stem>_<device>{_quick}{suffix}.{json,md}``: the environment, the command, the
    arguments and one result per net."""
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "command": command_line(script, argv),
           "args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    suffix = ("_quick" if args.quick else "") + (args.suffix or "")
    record(args.out, f"{stem}_{args.device}{suffix}", rec, to_markdown(rec))
    return rec


def header_markdown(rec: dict, script: str) -> list[str]:
    """The environment, the command and the objective every synthesis record opens with."""
    a = rec["args"]
    cmd = rec.get("command") or " ".join([f"python benches/{script}", *rec["argv"]])
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
    return lines


def net_title(name: str, args, what: str) -> None:
    print(f"{name}, batch {args.batch_of[name]}, {'x'.join(map(str, SHAPES[name][1:]))} — {what}", flush=True)
