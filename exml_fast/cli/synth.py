"""The synthesis commands of ``exml-fast``: ``train-teacher`` and ``synthesize``.

Train an expert, then synthesise data from it alone::

    exml-fast train-teacher --dataset mnist --arch lenet5bn --epochs 1 --seed 0 --out mnist.pt
    exml-fast synthesize --teacher mnist.pt --method deepinversion -n 1024 --out runs/di

``synthesize`` writes atomic shards (``shard_00000.pt`` ..., ``manifest.json``)
to ``--out`` as it goes; rerunning the same command after an interruption
continues where it stopped and gives the same images as an uninterrupted run.
It then writes ``--out/grid.png`` (the first up-to-100 images) and prints
images, time, images/s and the fraction the teacher labels as their target.
Read the result with ``exml_fast.synth.load_synthetic(folder)``.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace
from typing import Any

import torch

from exml_fast._utils.dtypes import PRECISIONS as _PRECISION_DTYPES
from exml_fast.checkpoint import load_model, save_model
from exml_fast.cli.common import (UsageError, class_list, device_arg, positive_float, positive_int, resolve_device,
                                  say, torchrun_group)
from exml_fast.data import DATASETS
from exml_fast.models import ARCHS
from exml_fast.synth.presets import PRESET_NAMES

__all__ = ["add_commands"]

METHODS = ("deepinversion", "model-inversion", "data-impressions", "auxiliary")
PRECISIONS = tuple(_PRECISION_DTYPES)
GRID_IMAGES = 100

CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}


def add_commands(sub) -> None:
    """Adds train-teacher and synthesize to the ``exml-fast`` subparsers ``sub``."""
    t = sub.add_parser(
        "train-teacher", help="train an expert on MNIST / Fashion-MNIST and save a checkpoint",
        description="Train a classifier on 32x32 normalised MNIST or Fashion-MNIST (SGD, the Ex-Model CL "
                    "expert recipe), print its test accuracy and save an exml_fast checkpoint.",
    )
    t.add_argument("--dataset", choices=DATASETS, default="mnist", help="training data (default: mnist)")
    t.add_argument("--arch", choices=sorted(ARCHS), default="lenet5bn", help="architecture (default: lenet5bn)")
    t.add_argument("--epochs", type=positive_int, default=1, help="training epochs (default: 1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order (default: 0)")
    t.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write")
    t.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="train on the first N training images only (quick runs)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size (default: 64)")
    t.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (default: 0.01)")
    t.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    t.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the dataset files (default: the exml_fast.data search path)")
    t.set_defaults(func=_train_teacher, subparser=t)

    s = sub.add_parser(
        "synthesize", help="synthesise images from a teacher checkpoint (resumable)",
        description="Synthesise n images from a teacher checkpoint into --out (atomic shards; rerun the same "
                    "command to resume an interrupted job), then write --out/grid.png and a summary. Under "
                    "torchrun (torchrun --nproc_per_node=K -m exml_fast synthesize ...) the batches are shared "
                    "out between the K ranks (gloo on the CPU, NCCL with --device cuda); --out must be a folder "
                    "every rank reaches.",
    )
    s.add_argument("--teacher", required=True, metavar="CKPT", help="checkpoint from train-teacher / save_model")
    s.add_argument("--method", required=True, choices=METHODS, help="synthesis method")
    s.add_argument("-n", type=positive_int, required=True, help="number of images")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (shards, manifest.json, grid.png)")
    s.add_argument("--batch-size", type=positive_int, default=None,
                   help="images optimised together (default: the method's)")
    s.add_argument("--iterations", type=positive_int, default=None,
                   help="optimisation steps per batch (default: the method's; not for auxiliary)")
    s.add_argument("--classes", type=class_list, default=None, metavar="C,C,...",
                   help="class indices to synthesise, balanced (default: all)")
    s.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same images (default: 0)")
    s.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    s.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="teacher forward precision (default: the method's, fp32)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: picked from the teacher; on the CPU channels_last "
                        "for networks with convolutions of 16+ input channels)")
    s.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each step in a CUDA graph (default: on a CUDA device without --compile, with an "
                        "eager fallback; --no-cuda-graph: never)")
    s.add_argument("--compile", action="store_true", help="torch.compile the step")
    s.add_argument("--lr", type=positive_float, default=None, help="learning rate of x (default: the method's)")
    s.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="deepinversion: the settings preset (default: digits for a teacher trained on MNIST / "
                        "Fashion-MNIST, else auto: picked from the teacher); cifar10 is cifar's older name")
    s.add_argument("--aux-dataset", choices=DATASETS, default=None,
                   help="auxiliary: the unrelated dataset whose train split is labelled by the teacher "
                        "(default: the other one of mnist / fashion-mnist than the teacher's)")
    s.add_argument("--data-root", default=None, metavar="DIR", help="auxiliary: folder holding the dataset files")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="write --out/grid.png with the first up-to-100 images (default: yes)")
    s.set_defaults(func=_synthesize, subparser=s)




def _train_teacher(args: argparse.Namespace) -> int:
    from exml_fast.data import DATASET_STATS, mnist_tensors
    from exml_fast.models import build_model
    from exml_fast.training import evaluate, train_classifier

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    x_train, y_train = mnist_tensors("train", dataset=args.dataset, pad_to=32, normalize=True, root=args.data_root)
    x_test, y_test = mnist_tensors("test", dataset=args.dataset, pad_to=32, normalize=True, root=args.data_root)
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    t_data = time.perf_counter() - t0
    num_classes = 10
    print(f"[data] {args.dataset}: train {tuple(x_train.shape)}, test {tuple(x_test.shape)} ({t_data:.1f} s)")

    # build_model draws its initialisation from the global generator: fork it so the seed stays local.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args.arch, num_classes=num_classes, in_channels=1)
    model = model.to(device)
    print(f"[train] {args.arch} on {device}, {args.epochs} epoch(s), batch {args.batch_size}, SGD lr {args.lr}, "
          f"seed {args.seed}")
    t0 = time.perf_counter()
    train_classifier(model, x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     generator=torch.Generator().manual_seed(args.seed))
    t_train = time.perf_counter() - t0
    acc = evaluate(model, x_test, y_test)
    print(f"[train] test accuracy {acc:.4f} ({t_train:.1f} s)")

    mean, std = DATASET_STATS[args.dataset]
    save_model(
        model, args.out, arch=args.arch, num_classes=num_classes, in_channels=1, input_shape=(1, 32, 32),
        mean=(mean,), std=(std,), classes=CLASS_NAMES[args.dataset],
        metadata={"dataset": args.dataset, "epochs": args.epochs, "seed": args.seed, "limit": args.limit,
                  "train_images": int(x_train.shape[0]), "batch_size": args.batch_size, "lr": args.lr,
                  "test_accuracy": acc},
    )
    print(f"[save] {args.out}")
    return 0


def _aux_data(args: argparse.Namespace, info: Any) -> torch.Tensor:
    """The auxiliary dataset's train split in the teacher's input space: (N, C, H, W) float32."""
    from exml_fast.data import DATASETS, auxiliary_inputs

    name = args.aux_dataset
    if name is None:
        own = info.metadata.get("dataset")
        if own not in DATASETS:
            raise UsageError("--aux-dataset is required: the teacher checkpoint does not say which dataset it "
                              f"was trained on (choose from {', '.join(DATASETS)})")
        name = next(d for d in DATASETS if d != own)
    try:
        x = auxiliary_inputs(name, input_shape=info.input_shape, mean=info.mean, std=info.std, root=args.data_root)
    except ValueError as e:
        raise UsageError(f"--method auxiliary: {e}") from None
    print(f"[data] auxiliary {name}: {x.shape[0]} images {tuple(x.shape[1:])}")
    return x


# Teachers of these datasets get DeepInversion's "digits" preset unless --preset says otherwise: the settings
# this command has used for them since it exists (BN 1 with the first layer x10, TV 0.05, no flips).
_DIGIT_DEEPINVERSION_DATASETS = ("mnist", "fashion-mnist")


def _deepinversion_preset(args: argparse.Namespace, info: Any) -> str:
    """The DeepInversion preset of a ``synthesize`` run: --preset, else "digits" for an MNIST / Fashion-MNIST
    teacher, else "auto"."""
    if args.preset is not None:
        return args.preset
    return "digits" if info.metadata.get("dataset") in _DIGIT_DEEPINVERSION_DATASETS else "auto"


def _make_synthesizer(args: argparse.Namespace, teacher: torch.nn.Module, info: Any, device: torch.device):
    from exml_fast import synth

    if args.method == "auxiliary":
        return synth.AuxiliaryData(teacher, _aux_data(args, info), mean=info.mean, std=info.std, device=device)
    cls = {"deepinversion": synth.DeepInversion, "model-inversion": synth.ModelInversion,
           "data-impressions": synth.DataImpressions}[args.method]
    kwargs: dict[str, Any] = dict(input_shape=tuple(info.input_shape), mean=info.mean, std=info.std,
                                  num_classes=info.num_classes, device=device,
                                  channels_last=args.channels_last, cuda_graph=args.cuda_graph, compile=args.compile)
    if args.method == "deepinversion":
        kwargs["preset"] = _deepinversion_preset(args, info)
    if args.precision is not None:
        kwargs["precision"] = args.precision
    if args.lr is not None:
        kwargs["lr"] = args.lr
    return cls(teacher, **kwargs)


def _check_synthesize_args(args: argparse.Namespace) -> torch.device:
    device = resolve_device(args.device)
    if args.method == "auxiliary":
        given = [flag for flag, value in (("--iterations", args.iterations), ("--lr", args.lr),
                                          ("--precision", args.precision), ("--channels-last", args.channels_last),
                                          ("--cuda-graph", args.cuda_graph), ("--compile", args.compile))
                 if value not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)}: not used by --method auxiliary (it labels real images, "
                              "no optimisation)")
    elif args.aux_dataset is not None:
        raise UsageError(f"--aux-dataset: only used by --method auxiliary (got --method {args.method})")
    if args.preset is not None and args.method != "deepinversion":
        raise UsageError(f"--preset: only used by --method deepinversion (got --method {args.method})")
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device; the device is {device}")
    return device


def _shard_stats(folder: str) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of each shard file in ``folder``: which batches were on disk before a run."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in os.listdir(folder):
        if name.startswith("shard_") and name.endswith(".pt"):
            st = os.stat(os.path.join(folder, name))
            out[name] = (st.st_mtime_ns, st.st_size)
    return out


def _synthesize(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank joins the group (gloo on the CPU, NCCL on
    cuda:LOCAL_RANK) and the job is sharded over the ranks (Synthesizer.synthesize's
    ``distributed``); each rank reports its own batches, rank 0 the whole job and the grid."""
    with torchrun_group(_check_synthesize_args(args)) as device:
        return _synthesize_on(args, device)


def _synthesize_on(args: argparse.Namespace, device: torch.device) -> int:
    from exml_fast._utils import dist
    from exml_fast.synth.batch import read_manifest, shard_name
    from exml_fast.viz import save_grid

    rank, world = dist.rank_and_world()
    who = f"[synthesize rank {rank}/{world}]" if world > 1 else "[synthesize]"

    teacher, info = load_model(args.teacher, map_location=device)
    if args.classes is not None and max(args.classes) >= info.num_classes:
        raise UsageError(f"--classes: the teacher has {info.num_classes} classes (0..{info.num_classes - 1}); "
                          f"got {','.join(map(str, args.classes))}")
    synth = _make_synthesizer(args, teacher, info, device)

    kwargs: dict[str, Any] = dict(classes=args.classes, batch_size=args.batch_size, generator=args.seed,
                                  progress=not args.no_progress, save_to=args.out)
    if args.iterations is not None:
        kwargs["iterations"] = args.iterations
    preset = f", preset {synth.preset_name}" if args.method == "deepinversion" else ""
    if rank == 0:
        shards = f", sharded over {world} ranks" if world > 1 else ""
        say(f"[synthesize] {args.method}{preset}: {args.n} images from {args.teacher} ({info.arch}, "
            f"{info.num_classes} classes) on {device}{shards}, seed {args.seed} -> {args.out}")
    before = _shard_stats(args.out)
    t0 = time.perf_counter()
    total = made = 0
    per_batch: dict[str, list[torch.Tensor]] = {}
    grid_x: list[torch.Tensor] = []
    grid_y: list[torch.Tensor] = []
    first = None
    # Every batch (sharded: of this rank, indices rank, rank + world, ...) is seen once, whether
    # computed now or read back from a shard of an earlier run, so the summary and the grid cover
    # the job without re-reading it. The generator comes first in zip: its last next() runs the
    # job's end (the manifest; sharded, a collective) before zip stops.
    for b, index in zip(synth.synthesize_iter(args.n, **kwargs), range(rank, args.n, world)):
        first = first or b
        total += len(b)
        name = shard_name(index)
        if name not in before or _shard_stats(args.out).get(name) != before[name]:
            made += len(b)
        for key in ("teacher_acc", "confidence"):
            if key in b.losses:
                per_batch.setdefault(key, []).append(b.losses[key].detach().float().cpu())
        shown = sum(len(t) for t in grid_x)
        if shown < GRID_IMAGES:
            grid_x.append(b.x[: GRID_IMAGES - shown].detach().cpu())
            grid_y.append(b.y[: GRID_IMAGES - shown].detach().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0

    quality = "n/a"
    for key, what in (("teacher_acc", "mean teacher accuracy"), ("confidence", "mean teacher confidence")):
        if per_batch.get(key):
            quality = f"{what} {torch.cat(per_batch[key]).mean().item():.4f}"
            break
    rate = f"{made / elapsed:.1f} images/s" if made and elapsed > 0 else "nothing new to do"
    mine = " of this rank's batches" if world > 1 else ""
    say(f"{who} {total} images{mine} in {args.out} ({made} made by this run, {total - made} on disk before); "
        f"{elapsed:.2f} s, {rate}; {quality}")
    if world > 1 and rank == 0 and read_manifest(args.out)["complete"]:
        say(f"[synthesize] all {world} ranks done: the job's {args.n} images are complete in {args.out}")
    if args.grid and first is not None and rank == 0:
        grid_path = os.path.join(args.out, "grid.png")
        x = torch.cat(grid_x)
        save_grid(SimpleNamespace(x=x, y=torch.cat(grid_y), mean=first.mean, std=first.std), grid_path)
        say(f"[save] {grid_path} ({len(x)} images); read the job with exml_fast.synth.load_synthetic({args.out!r})")
    return 0


# --------------------------------------------------------------------------------------------------------- main
