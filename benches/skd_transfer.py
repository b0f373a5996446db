"""SKD's knowledge-transfer sanity figure (papers/self-distilled-knowledge-delegator.txt, Table I) on MNIST and
Fashion-MNIST teachers.

For each dataset a teacher T_0 (LeNet-5-BN, the class-incremental strategies' learner, all 10 classes) is
trained on the training split with the experts' recipe (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch
64). A knowledge delegator is then fitted data-free against it with ``GenerativeSynthesizer`` at the ``skd``
preset (imitate & explore, SKD Algorithm 1: 5 imitate steps of the cloned student S_0 per explore step; SGD
0.1 / Adam 1e-3). As in the paper, S_0's classifier is then initialised from T_0's head ("We use H_0 of T_0 to
initialize classifier H_0' of S_0") and both are scored on the test split. The paper reports gaps under 1 %
(CIFAR-100 0.22 %, Caltech-101 0.74 %, Flowers-102 0.63 %, ImageNet-Subset 0.88 %). S_0 with its own head
(trained only by the explore loss's category term) is recorded beside it.

Nothing is chosen here: the budget (explore steps, batch, generator) is fixed on the command line before the
run, and the test split is only scored. Teachers and fits are kept under --state (the fit checkpoints
atomically every 100 steps), so a killed run resumes where it stopped.

Usage:
    python benches/skd_transfer.py [--datasets mnist,fashion-mnist] [--epochs 2] [--iterations 1000]
        [--batch 128] [--arch skd-narrow] [--seed 0] [--threads N] [--state runs/skd_transfer]
        [--out benches/results] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from benchlib import RESULTS, data_missing, env_markdown, environment, record

from exml_fast.checkpoint import load_model, save_model
from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.experiments.records import seconds_or_lower_bound
from exml_fast.models import LeNet5BN
from exml_fast.models.features import classifier_layer
from exml_fast.synth import GenerativeSynthesizer
from exml_fast.training import evaluate, train_classifier

PAPER = {"CIFAR-100": (76.08, 75.86), "Caltech-101": (76.64, 75.90), "Flowers-102": (84.54, 83.91),
         "ImageNet-Subset": (87.68, 86.80)}
DATASETS = ("mnist", "fashion-mnist")
ARCHS = ("skd-small", "skd-narrow", "skd-large")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: both)")
    p.add_argument("--epochs", type=int, default=2, help="teacher epochs over the training split (default: 2)")
    p.add_argument("--iterations", type=int, default=1000, help="explore steps of the fit (default: 1000)")
    p.add_argument("--batch", type=int, default=128, help="pseudo samples per step (default: 128)")
    p.add_argument("--arch", default="skd-narrow", choices=ARCHS,
                   help="the delegator (default: skd-narrow, Table IV at a quarter of the channels; "
                        "skd-small costs 5x more per step here)")
    p.add_argument("--seed", type=int, default=0, help="teacher initialisation and order, fit seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--state", default="runs/skd_transfer", help="teachers and fit checkpoints (resumable)")
    p.add_argument("--out", default=None,
                   help="directory for the record ('' to not record; default: benches/results, '' with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2000 training images, 10 explore steps of 32")
    args = p.parse_args(argv)
    bad = [d for d in args.datasets.split(",") if d not in DATASETS]
    if bad or not args.datasets:
        p.error(f"--datasets: unknown {bad}; choose from {', '.join(DATASETS)}")
    for name in ("epochs", "iterations", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: must be >= 1; got {getattr(args, name)}")
    if args.batch < 2:
        p.error(f"--batch: must be >= 2 (BatchNorm); got {args.batch}")
    if args.quick:
        args.iterations, args.batch = 10, 32
    if args.out is None:
        args.out = "" if args.quick else str(RESULTS)
    return args


def teacher_for(dataset: str, args) -> tuple[torch.nn.Module, float]:
    """T_0: read back from --state or trained there; and its test accuracy."""
    x, y = mnist_tensors("train", dataset=dataset)
    if args.quick:
        x, y = x[:2000], y[:2000]
    tag = "_quick" if args.quick else ""
    path = Path(args.state) / f"teacher_{dataset}_lenet5bn_e{args.epochs}_s{args.seed}{tag}.pt"
    if path.exists():
        teacher, _ = load_model(path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            teacher = LeNet5BN(num_classes=10, in_channels=1)
        t0 = time.perf_counter()
        train_classifier(teacher, x, y, epochs=args.epochs, batch_size=64, lr=0.01,
                         generator=torch.Generator().manual_seed(args.seed))
        print(f"  T_0 trained on {y.shape[0]} {dataset} images ({time.perf_counter() - t0:.0f} s)", flush=True)
        mean, std = DATASET_STATS[dataset]
        save_model(teacher, path, arch="lenet5bn", num_classes=10, in_channels=1, input_shape=(1, 32, 32),
                   mean=(mean,), std=(std,), metadata={"dataset": dataset, "epochs": args.epochs, "seed": args.seed})
    teacher.eval()
    xt, yt = mnist_tensors("test", dataset=dataset)
    return teacher, evaluate(teacher, xt, yt)


def with_head_of(student: torch.nn.Module, teacher: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``student`` whose classifier layer holds ``teacher``'s (SKD Table I's S_0 with H_0)."""
    s = copy.deepcopy(student)
    classifier_layer(s, "skd_transfer").load_state_dict(classifier_layer(teacher, "skd_transfer").state_dict())
    return s.eval()


def run_dataset(dataset: str, args) -> dict:
    print(f"{dataset}:", flush=True)
    teacher, t_acc = teacher_for(dataset, args)
    print(f"  T_0 test accuracy {100 * t_acc:.2f} %", flush=True)
    mean, std = DATASET_STATS[dataset]
    synth = GenerativeSynthesizer(teacher, input_shape=(1, 32, 32), mean=(mean,), std=(std,), preset="skd",
                                  generator_arch=args.arch)
    tag = "_quick" if args.quick else ""
    ckpt = Path(args.state) / f"fit_{dataset}_{args.arch}_n{args.iterations}_b{args.batch}_s{args.seed}{tag}.pt"
    t0 = time.perf_counter()
    fit = synth.fit(args.iterations, batch_size=args.batch, generator=args.seed, checkpoint=ckpt,
                    progress=sys.stderr.isatty())
    # every step's time, summed over the calls that resumed the fit (unknown for a checkpoint written without it)
    fit_s, fit_incomplete = seconds_or_lower_bound(fit.seconds, t0)
    at_least = "≥ " if fit_incomplete else ""
    xt, yt = mnist_tensors("test", dataset=dataset)
    s_acc = evaluate(with_head_of(fit.student, teacher), xt, yt)
    own = evaluate(fit.student.eval(), xt, yt)
    last = {k: float(v[-1]) for k, v in fit.history.items() if v and isinstance(v[-1], (int, float))}
    print(f"  S_0 with T_0's head {100 * s_acc:.2f} % (gap {100 * (t_acc - s_acc):.2f} points); "
          f"with its own head {100 * own:.2f} %; fit {at_least}{fit_s:.0f} s", flush=True)
    return {"dataset": dataset, "teacher_test_acc": t_acc, "student_test_acc": s_acc, "gap": t_acc - s_acc,
            "student_own_head_test_acc": own, "fit_s": fit_s, "fit_s_incomplete": fit_incomplete,
            "iterations": fit.iterations,
            "last_logged_terms": last, "test_images": int(yt.shape[0])}


def markdown(env: dict, cmd: str, args, rows: list[dict]) -> str:
    lines = env_markdown(env, "SKD knowledge transfer (Table I)", cmd)
    lines += [
        f"T_0: LeNet-5-BN trained {args.epochs} epochs on the whole training split (SGD 0.01, momentum 0.9, weight "
        f"decay 5e-4, batch 64, seed {args.seed}). Delegator: `GenerativeSynthesizer(preset=\"skd\", "
        f"generator_arch={args.arch!r})`, {args.iterations} explore steps of {args.batch} pseudo samples (5 "
        "imitate steps of S_0 each). S_0 scored with T_0's classifier, as in SKD Table I, on the whole test "
        "split; nothing was chosen on it.",
        "",
        "| dataset | T_0 | S_0 (T_0's head) | gap (points) | S_0 (own head) | fit steps | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['dataset']} | {100 * r['teacher_test_acc']:.2f} % | {100 * r['student_test_acc']:.2f} % | "
                     f"{100 * r['gap']:.2f} | {100 * r['student_own_head_test_acc']:.2f} % | {r['iterations']} | "
                     f"{'≥ ' if r['fit_s_incomplete'] else ''}{r['fit_s']:.0f} |")
    lines += ["", "SKD Table I (ResNet-32 / ResNet-18 teachers on 50 base classes; their figures, not rerun here):",
              "", "| dataset | T_0 | S_0 | gap |", "|---|---:|---:|---:|"]
    for name, (t, s) in PAPER.items():
        lines.append(f"| {name} | {t:.2f} % | {s:.2f} % | {t - s:.2f} |")
    lines += ["", "A fit's seconds are its steps' time summed over the calls that resumed it (≥: resumed from a "
              "checkpoint that did not record its time)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if data_missing(args.datasets.split(",")):
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    env = environment("cpu", "SKD knowledge transfer")
    rows = [run_dataset(ds, args) for ds in args.datasets.split(",")]
    env["wall_s"] = time.perf_counter() - wall0
    cmd = "python benches/skd_transfer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rec = {"env": env, "args": vars(args), "rows": rows, "paper": PAPER}
    record(args.out, f"skd_transfer_cpu_{args.arch}", rec, markdown(env, cmd.strip(), args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
