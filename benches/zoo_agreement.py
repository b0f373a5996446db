"""Does synthesis work out of the box? Teacher agreement of the synthesizers' defaults on a zoo of teachers.

For each teacher of :data:`exml_fast.experiments.zoo.ZOO` (LeNet-5-BN, a slim ResNet-18 and MobileNetV2 with
BatchNorm; a BN-free LeNet-5; a GroupNorm CNN — each trained for a fraction of an epoch on MNIST or
Fashion-MNIST, as ``python_tests/synth/test_zoo.py`` trains them), this script synthesises 20 images (two per
class, one batch) with

- ``DeepInversion(teacher, input_shape, mean, std)``: every default (the ``auto`` preset);
- ``DeepInversion(..., preset="cifar")``: the defaults before ``auto`` (BN x10, flips), for comparison;
- ``ModelInversion(teacher, input_shape, mean, std)``: every default (``bn_weight="auto"``);

with the step budget the zoo gives the teacher (only ``iterations``/``batch_size`` set), and records the
teacher's test accuracy (the first 2000 test images; not used to choose anything), the agreement (fraction of
the images the teacher labels as their target, one clean forward), the kept batch's weighted loss terms, the
BN weight the rule picked, the BN term of a batch of 20 real training images for comparison, and the seconds.

Then the case the defaults were reported failing on (issue 15): a LeNet-5-BN trained one epoch on all of MNIST,
``DeepInversion(teacher, input_shape=(1, 32, 32), mean, std).synthesize(100, classes=range(10))`` with every
default, iterations included (2000 steps), under ``auto`` and under ``preset="cifar"`` (the old defaults).

Usage:
    python benches/zoo_agreement.py [--teachers lenet5_bn,...] [--seeds 0 1] [--threads N] [--no-issue-case]
        [--out benches/results]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from benchlib import RESULTS, data_missing, env_markdown, environment, record

from exml_fast.data import DATASET_STATS, mnist_tensors
from exml_fast.experiments.zoo import ZOO, agreement, normalisation, train_zoo_teacher
from exml_fast.synth import DeepInversion, LowAgreementWarning, ModelInversion
from exml_fast.synth.matcher import BNStatsMatcher
from exml_fast.synth.presets import has_batchnorm

N_IMAGES = 20
METHODS = {
    "DeepInversion (auto)": lambda t, **kw: DeepInversion(t, **kw),
    "DeepInversion (preset cifar, the old defaults)": lambda t, **kw: DeepInversion(t, preset="cifar", **kw),
    "ModelInversion": lambda t, **kw: ModelInversion(t, **kw),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="synthesis seeds (the teacher is trained once, seed 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, as the test runs; the teachers' training, and so the "
                        "figures, change a little with it)")
    p.add_argument("--no-issue-case", action="store_true",
                   help="skip the one-epoch LeNet-5-BN, 100 images at every default (about a minute)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the synthesizers' precision= (autocast of the networks; x, Adam and the statistics stay "
                        "fp32); the record is zoo_agreement_cpu_<precision> unless fp32")
    p.add_argument("--out", default=str(RESULTS), help="directory for the record ('' to not record)")
    args = p.parse_args(argv)
    bad = [t for t in args.teachers.split(",") if t not in ZOO]
    if bad:
        p.error(f"--teachers: unknown {bad}; choose from {', '.join(ZOO)}")
    return args


def real_bn_term(teacher, name: str, synth) -> float | None:
    """The BN term (the synthesizer's form and first-layer multiplier) of 20 real training images."""
    if not has_batchnorm(teacher):
        return None
    x, _ = mnist_tensors("train", dataset=ZOO[name].dataset)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(123))[:N_IMAGES]
    with BNStatsMatcher(teacher, form=synth.bn_form, first_bn_multiplier=synth.first_bn_multiplier) as bn, \
            torch.no_grad():
        teacher(x[idx])
        return float(bn.loss())


def run_teacher(name: str, seeds: list[int], precision: str = "fp32") -> dict:
    z = ZOO[name]
    teacher, acc, train_s = train_zoo_teacher(name, seed=0)
    print(f"{name} ({z.kind}, {z.dataset}): {z.train_images} images, test accuracy {acc:.4f}, "
          f"trained in {train_s:.0f} s", flush=True)
    mean, std = normalisation(name)
    rows = []
    for method, make in METHODS.items():
        iters = z.mi_iterations if method == "ModelInversion" else z.di_iterations
        for seed in seeds:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LowAgreementWarning)
                synth = make(teacher, input_shape=(1, 32, 32), mean=mean, std=std, precision=precision)
                t0 = time.perf_counter()
                batch = synth.synthesize(N_IMAGES, iterations=iters, batch_size=N_IMAGES, generator=seed,
                                         progress=False)
                seconds = time.perf_counter() - t0
            row = {"method": method, "seed": seed, "iterations": iters, "seconds": seconds,
                   "agreement": agreement(teacher, batch),
                   "teacher_acc_kept_step": float(batch.losses["teacher_acc"][0]),
                   "bn_weight": synth.bn_weight, "flip": synth.flip,
                   "weighted_terms": synth.weighted_terms(batch.losses),
                   "bn_term_kept": float(batch.losses["bn"][0]) if "bn" in batch.losses else None,
                   "bn_term_real_batch": real_bn_term(teacher, name, synth),
                   "warned": any(issubclass(w.category, LowAgreementWarning) for w in caught)}
            rows.append(row)
            print(f"  {method}, seed {seed}: agreement {row['agreement']:.2f} in {iters} steps, {seconds:.1f} s "
                  f"(bn_weight {synth.bn_weight:.3g}; BN term {row['bn_term_kept']} vs real "
                  f"{row['bn_term_real_batch']}; warned {row['warned']})", flush=True)
    return {"name": name, "kind": z.kind, "dataset": z.dataset, "train_images": z.train_images,
            "schedule": z.schedule, "test_accuracy": acc, "train_s": train_s, "rows": rows}


def issue_case(seeds: list[int], precision: str = "fp32") -> dict:
    """LeNet-5-BN trained one epoch on MNIST; 100 images of classes 0-9 with every default, auto vs cifar."""
    from exml_fast.models import LeNet5BN
    from exml_fast.training import evaluate, train_classifier

    x, y = mnist_tensors("train")
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = train_classifier(LeNet5BN(10, in_channels=1), x, y, epochs=1, batch_size=64, generator=g).eval()
    xt, yt = mnist_tensors("test")
    acc = evaluate(teacher, xt, yt)
    mean, std = DATASET_STATS["mnist"]
    print(f"issue case: LeNet-5-BN, one epoch on MNIST, test accuracy {acc:.4f}", flush=True)
    rows = []
    for preset in ("auto", "cifar"):
        for seed in seeds:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LowAgreementWarning)
                synth = DeepInversion(teacher, input_shape=(1, 32, 32), mean=mean, std=std, preset=preset,
                                      precision=precision)
                t0 = time.perf_counter()
                batch = synth.synthesize(100, classes=range(10), generator=seed, progress=False)
                seconds = time.perf_counter() - t0
            row = {"preset": preset, "seed": seed, "iterations": synth.iterations, "seconds": seconds,
                   "agreement": agreement(teacher, batch), "bn_weight": synth.bn_weight, "flip": synth.flip,
                   "warned": any(issubclass(w.category, LowAgreementWarning) for w in caught)}
            rows.append(row)
            print(f"  preset {preset}, seed {seed}: agreement {row['agreement']:.2f} in {synth.iterations} steps, "
                  f"{seconds:.1f} s (bn_weight {synth.bn_weight:.3g}, flip {synth.flip}; warned {row['warned']})",
                  flush=True)
    return {"test_accuracy": acc, "rows": rows}


def markdown(env: dict, cmd: str, teachers: list[dict], case: dict | None = None, precision: str = "fp32") -> str:
    lines = env_markdown(env, "zoo agreement (synthesis out of the box)", cmd)
    if precision != "fp32":
        lines += [f"Every synthesizer with `precision=\"{precision}\"`: the networks' forward and backward under "
                  f"{precision} autocast; x, its gradient, Adam and the statistics stay fp32.", ""]
    lines += [
        f"{N_IMAGES} images (two per class) in one batch per run; agreement = fraction the teacher labels as "
        "their target (clean forward of the kept batch), one entry per seed. Teachers trained once (seed 0) "
        "for a fraction of an epoch; test accuracy on the first 2000 test images.",
        "",
        "| teacher | data (train images) | test acc. | method | steps | agreement | s / run | BN weight | "
        "BN term: kept / real batch |",
        "|---|---|---:|---|---:|---|---:|---:|---|",
    ]
    for t in teachers:
        by_method: dict[str, list[dict]] = {}
        for r in t["rows"]:
            by_method.setdefault(r["method"], []).append(r)
        for method, rs in by_method.items():
            ag = " ".join(f"{r['agreement'] * 100:.0f} %" for r in rs)
            secs = sum(r["seconds"] for r in rs) / len(rs)
            bn = "—" if rs[0]["bn_term_kept"] is None else (
                f"{rs[0]['bn_term_kept']:.3g} / {rs[0]['bn_term_real_batch']:.3g}")
            lr = "" if t.get("schedule", "constant") == "constant" else f", {t['schedule']} lr"
            lines.append(f"| {t['name']} ({t['kind']}) | {t['dataset']} ({t['train_images']}{lr}) | "
                         f"{t['test_accuracy'] * 100:.1f} % | {method} | {rs[0]['iterations']} | {ag} | "
                         f"{secs:.1f} | {rs[0]['bn_weight']:.3g} | {bn} |")
    if case is not None:
        lines += [
            "",
            f"The reported case: LeNet-5-BN trained one epoch on all of MNIST (test accuracy "
            f"{case['test_accuracy'] * 100:.2f} %), `DeepInversion(teacher, input_shape=(1, 32, 32), mean, std"
            "[, preset]).synthesize(100, classes=range(10))`, every default (iterations included):",
            "",
            "| preset | steps | flips | BN weight | agreement (per seed) | s / run | warned |",
            "|---|---:|---|---:|---|---:|---|",
        ]
        for preset in ("auto", "cifar"):
            rs = [r for r in case["rows"] if r["preset"] == preset]
            ag = " ".join(f"{r['agreement'] * 100:.0f} %" for r in rs)
            lines.append(f"| {preset} | {rs[0]['iterations']} | {'yes' if rs[0]['flip'] else 'no'} | "
                         f"{rs[0]['bn_weight']:.3g} | {ag} | {sum(r['seconds'] for r in rs) / len(rs):.1f} | "
                         f"{' '.join('yes' if r['warned'] else 'no' for r in rs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if data_missing(sorted({ZOO[t].dataset for t in args.teachers.split(",")})):
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    env = environment("cpu", "zoo agreement")
    teachers = [run_teacher(name, args.seeds, args.precision) for name in args.teachers.split(",")]
    case = None if args.no_issue_case else issue_case(args.seeds, args.precision)
    env["wall_s"] = time.perf_counter() - wall0
    cmd = "python benches/zoo_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stem = "zoo_agreement_cpu" + ("" if args.precision == "fp32" else f"_{args.precision}")
    record(args.out, stem, {"env": env, "n_images": N_IMAGES, "precision": args.precision, "teachers": teachers,
                            "issue_case": case},
           markdown(env, cmd.strip(), teachers, case, args.precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
