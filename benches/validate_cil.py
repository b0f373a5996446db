"""Choose a class-incremental setting on a validation split, never on the test set.

Runs the settings of one strategy family on Split MNIST with ``validation_size`` training images held out
(exml_fast.cl.scenarios: the same fixed draw for every seed) and evaluated instead of the test set, for a few
seeds, at the reduced "demo" budget of ``exml-fast reproduce cil-mnist`` (2 epochs per task, 300 synthesis
steps — DeepInversion's steps, or SKD's explore steps of each delegator fit —, 50 images per old class)
unless --budget paper (or smoke, seconds: a pipeline check). Prints and records the final accuracy on all
classes and the average incremental accuracy of each setting, mean over the seeds.

--family deepinversion-cil (``cil_dicil_validation``): Eq. 11 as the paper gives it (deepinversion-cil), each
of the two changes alone (the new data's cross-entropy over its own classes; the balanced classifier
fine-tuning), both (deepinversion-cil-balanced), and on top of both the images made in two rounds (the second
halfway through the task), plain or as Adaptive DeepInversion against the learner (competition weight 1 or 10).

--family skd (``cil_skd_validation``): SKD-CIL with its delegator as SKD's Table IV gives it (skd-small), at a
quarter of the channels (skd-narrow, ~11x cheaper per sample on the CPU), and narrow with SKD's batch of 256.

--settings 2 3 runs only those rows of the family (1-based, in the order above) and records them under
``<name>_settings-2-3``, so that two processes can share a family's rows on two cores without one
overwriting the other's record.

Usage:
    python benches/validate_cil.py [--family deepinversion-cil|skd] [--seeds 1 2] [--budget demo|paper|smoke]
        [--settings I ...] [--validation-size 6000] [--threads N] [--out benches/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from benchlib import RESULTS, environment, env_markdown, record

from exml_fast.cl.engine import run_stream
from exml_fast.cl.scenarios import make_scenario
from exml_fast.cl.strategies.registry import build_strategy, options_read_by
from exml_fast.experiments.cil import CIL_BUDGETS

#: (label, strategy, options over the budget's)
DICIL_SETTINGS = [
    ("Eq. 11 (deepinversion-cil)", "deepinversion-cil", {}),
    ("+ ce_classes=new", "deepinversion-cil", {"ce_classes": "new"}),
    ("+ head_epochs=1", "deepinversion-cil", {"head_epochs": 1}),
    ("both (deepinversion-cil-balanced)", "deepinversion-cil-balanced", {}),
    ("both, 2 synthesis rounds", "deepinversion-cil-balanced", {"synth_rounds": 2}),
    ("both, 2 rounds, ADI weight 1", "deepinversion-cil-balanced", {"synth_rounds": 2, "competition_weight": 1.0}),
    ("both, 2 rounds, ADI weight 10", "deepinversion-cil-balanced", {"synth_rounds": 2, "competition_weight": 10.0}),
]
SKD_SETTINGS = [
    ("skd, skd-small (SKD's Table IV)", "skd", {}),
    ("skd, skd-narrow", "skd", {"gen_arch": "skd-narrow"}),
    ("skd, skd-narrow, batch 256", "skd", {"gen_arch": "skd-narrow", "synth_batch_size": 256}),
]
#: family -> (settings, record name)
FAMILIES = {"deepinversion-cil": (DICIL_SETTINGS, "cil_dicil_validation"), "skd": (SKD_SETTINGS, "cil_skd_validation")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="deepinversion-cil")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--budget", choices=["demo", "paper", "smoke"], default="demo")
    p.add_argument("--settings", type=int, nargs="+", default=None,
                   help="only these rows of the family, 1-based (default: all)")
    p.add_argument("--validation-size", type=int, default=6000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS), help="directory for the record ('' to not record)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    env = environment("cpu", "class-incremental validation")
    settings, name = FAMILIES[args.family]
    if args.settings is not None:
        if len(set(args.settings)) != len(args.settings) or not all(1 <= i <= len(settings) for i in args.settings):
            p.error(f"--settings: distinct row numbers from 1 to {len(settings)} for --family {args.family}; "
                    f"got {args.settings}")
        settings = [settings[i - 1] for i in sorted(args.settings)]
        name += "_settings-" + "-".join(map(str, sorted(args.settings)))
    spec = CIL_BUDGETS[args.budget]
    budget = spec["run"]
    rows = []
    for label, strategy, extra in settings:
        finals, aias = [], []
        for seed in args.seeds:
            sc = make_scenario("split_mnist", seed=seed, validation_size=args.validation_size,
                               eval_split="validation", **spec.get("scenario", {}))
            options = {**options_read_by(strategy, budget), **extra}
            s = build_strategy(strategy, None, sc, options=options, seed=seed, device=torch.device("cpu"),
                               progress=False)
            res = run_stream(s, None, sc, plots=False, progress=False, log=None)
            finals.append(100 * res.final_stream_accuracy)
            aias.append(100 * res.average_incremental_accuracy)
            print(f"  {label}, seed {seed}: final {finals[-1]:.2f} %, average incremental {aias[-1]:.2f} %",
                  flush=True)
        rows.append({"setting": label, "strategy": strategy, "options": extra, "finals": finals, "aias": aias,
                     "final_mean": statistics.mean(finals), "aia_mean": statistics.mean(aias)})
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv), "family": args.family,
           "budget": args.budget,
           "budget_detail": budget, "seeds": args.seeds, "validation_size": args.validation_size, "rows": rows}
    lines = env_markdown(env, "class-incremental validation", "python benches/validate_cil.py " + " ".join(rec["argv"]))
    lines += [f"Split MNIST, 5 tasks of 2 classes; {args.validation_size} training images held out and evaluated "
              f"instead of the test set; budget **{args.budget}** ({budget}); seeds {args.seeds}. Accuracy on all "
              "classes after the last task and average incremental accuracy, %.", "",
              "| setting | final (per seed) | final, mean | average incremental, mean |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {', '.join(f'{v:.2f}' for v in r['finals'])} | {r['final_mean']:.2f} | "
                     f"{r['aia_mean']:.2f} |")
    if args.out:
        record(args.out, f"{name}{'' if args.budget == 'demo' else '_' + args.budget}", rec,
               "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
