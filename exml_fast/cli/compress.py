"""The ``exml-fast compress`` command: quantise, prune or distil a saved model without its data.

    exml-fast compress quantize --model mnist.pt --out mnist_int8.pt2 --test mnist
    exml-fast compress prune --model mnist.pt --out mnist_pruned.pt2 --flops-ratio 0.5 --test mnist
    exml-fast compress distill --model mnist.pt --student lenet5_half --out student.pt --test mnist

Each job makes its images once into ``<out>.work/`` (rerun the same command to resume), writes ``--out``
atomically and prints a report, also written to ``<out>.report.json`` (see :mod:`exml_fast.compress.job`).
"""

from __future__ import annotations

import argparse

from exml_fast.cli.common import (angle, device_arg, nonnegative_float, positive_float, positive_int, resolve_device,
                                  say, zoom_range)
from exml_fast.compress.calibration import CALIBRATION_METHODS
from exml_fast.compress.job import TEST_SETS, compress_file
from exml_fast.models import ARCHS

__all__ = ["add_commands"]


def add_commands(sub) -> None:
    """Adds ``compress quantize|prune|distill`` to the ``exml-fast`` subparsers ``sub``."""
    c = sub.add_parser("compress", help="quantise, prune or distil a saved model without its data (resumable)",
                       description="Compress an exml_fast checkpoint using only images made from the model "
                                   "itself; writes --out, <out>.report.json and <out>.work/ (rerun to resume).")
    actions = c.add_subparsers(dest="action", required=True, metavar="<action>")
    q = actions.add_parser("quantize", help="int8 post-training quantisation (x86), calibrated on synthetic images",
                           description="int8 PT2E quantisation (torchao's X86InductorQuantizer) calibrated on "
                                       "synthetic images; writes a torch.export program (.pt2).")
    p = actions.add_parser("prune", help="structured channel pruning, scored and recovered on synthetic images",
                           description="Remove --flops-ratio of the MACs by channel pruning (importance from "
                                       "synthetic images), then distil the pruned model from the original on them; "
                                       "writes a torch.export program (.pt2).")
    d = actions.add_parser("distill", help="train a smaller student on the model's synthetic images",
                           description="Zero-shot knowledge distillation of --model into a new --student; writes an "
                                       "exml_fast checkpoint.")
    for a, n_default in ((q, 256), (p, 256), (d, 2048)):
        a.add_argument("--model", required=True, metavar="CKPT", help="checkpoint from train-teacher / save_model")
        a.add_argument("--out", required=True, metavar="FILE", help="file to write")
        a.add_argument("--method", choices=CALIBRATION_METHODS, default="deepinversion",
                       help="where the images come from (default: deepinversion)")
        a.add_argument("-n", type=positive_int, default=n_default, help=f"number of images (default: {n_default})")
        a.add_argument("--iterations", type=positive_int, default=None,
                       help="synthesis steps per batch (default: the method's)")
        a.add_argument("--seed", type=int, default=0, help="seed of the images and the training (default: 0)")
        a.add_argument("--test", choices=TEST_SETS, default=None,
                       help="measure accuracy before and after on this dataset's test split")
        a.add_argument("--test-n", type=positive_int, default=None, metavar="N", help="only the first N test images")
        a.add_argument("--no-latency", action="store_true", help="do not time the models (saves two compiles)")
        a.add_argument("--device", type=device_arg, default=None,
                       help="cpu or cuda[:N] for the synthesis, pruning and distillation (default: cuda when "
                            "available); the result is written and timed on the CPU")
        a.add_argument("--no-progress", action="store_true", help="no progress bars")
        a.set_defaults(func=_compress, subparser=a)
    p.add_argument("--flops-ratio", type=positive_float, default=0.5, help="share of the MACs to remove (default: 0.5)")
    p.add_argument("--importance", choices=("taylor", "bn_scale"), default="taylor",
                   help="channel importance (default: taylor, first-order on the synthetic images)")
    p.add_argument("--recover-epochs", type=int, default=100,
                   help="distillation epochs after pruning, 0 for none (default: 100)")
    p.add_argument("--recover-steps", type=positive_int, default=None, metavar="N",
                   help="distillation steps after pruning, in place of --recover-epochs (default: unset)")
    p.add_argument("--feature-weight", type=nonnegative_float, default=10.0, metavar="W",
                   help="the recovery also matches the BatchNorm outputs of the kept channels, at this weight "
                        "(0: logits only; default: 10)")
    p.add_argument("--rotate", type=angle, default=0.0, metavar="DEG",
                   help="the recovery rotates each image by up to this many degrees (default: 0)")
    p.add_argument("--scale", type=zoom_range, default=0.0, metavar="S",
                   help="the recovery zooms each image by a factor in [1 - S, 1 + S] (default: 0)")
    d.add_argument("--student", required=True, choices=sorted(ARCHS), help="the student's architecture")
    d.add_argument("--epochs", type=positive_int, default=100, help="passes over the images (default: 100)")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _compress(args: argparse.Namespace) -> int:
    extra = {}
    if args.action == "prune":
        extra = {"flops_ratio": args.flops_ratio, "importance": args.importance,
                 "recover_epochs": args.recover_epochs, "recover_steps": args.recover_steps,
                 "feature_weight": args.feature_weight, "rotate": args.rotate, "scale": args.scale}
    elif args.action == "distill":
        extra = {"student": args.student, "epochs": args.epochs}
    report = compress_file(args.action, args.model, args.out, method=args.method, n=args.n, seed=args.seed,
                           iterations=args.iterations, test=args.test, test_n=args.test_n,
                           latency=not args.no_latency, device=resolve_device(args.device),
                           progress=not args.no_progress, **extra)
    for key, value in report.items():
        if isinstance(value, dict):
            value = (f"median {value['median']:.3f} (range {value['min']:.3f}-{value['max']:.3f}, "
                     f"{value['rounds']} rounds)")
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        say(f"{key}: {_fmt(value)}")
    say(f"report: {args.out}.report.json")
    return 0
