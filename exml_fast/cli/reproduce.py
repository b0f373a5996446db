"""``exml-fast reproduce <experiment>``: the papers' tables with one command (resumable), recorded in
``benches/results``."""

from __future__ import annotations

from exml_fast.cli.common import UsageError, device_arg, positive_int, resolve_device
from exml_fast.experiments import EXPERIMENTS
from exml_fast.experiments.ablation import TEST_SEEDS, ablate_exml_mnist
from exml_fast.experiments.budgets import BUDGETS, ZSKD_BUDGETS
from exml_fast.experiments.cil import CIL_BUDGETS, CIL_EXPERIMENTS, reproduce_cil
from exml_fast.experiments.dfkd import DFKD_BUDGETS, DFKD_METHODS, DFKD_RECIPES, KD_SAMPLES, PUBLIC_DFKD, reproduce_dfkd
from exml_fast.experiments.table2 import reproduce_exml_mnist
from exml_fast.experiments.zskd import ZSKD_NETWORKS, reproduce_zskd

__all__ = ["add_commands"]


def add_commands(sub) -> None:
    """Adds reproduce to the ``exml-fast`` subparsers ``sub``."""
    q = sub.add_parser("reproduce", help="reproduce a paper table (resumable) and record it in benches/results",
                       description="Reproduce a published table with one command. exml-mnist: the Ex-Model CL "
                                   "paper's Table 2, MNIST columns (Split MNIST NC and Joint MNIST, every strategy), "
                                   "over --runs independent expert streams; zskd-mnist / zskd-fmnist: zero-shot KD "
                                   "from 24000 / 48000 Data Impressions (LeNet-5 -> LeNet-5-Half); dfkd-mnist: the "
                                   "same from a trained generator (DAFL / DFAD / SKD presets, selected on "
                                   "validation data) beside Data Impressions, with synthesis times; "
                                   "exml-mnist-ablation: the Ex-Model Distillation ablation on Split MNIST; "
                                   "cil-mnist / cil-fmnist: every class-incremental strategy on Split MNIST / "
                                   "Fashion-MNIST over --runs seeds. Writes "
                                   "<results>/<experiment>.{json,md} (<experiment>_<budget>.* for a reduced "
                                   "budget). Rerun to resume.")
    q.add_argument("experiment", choices=EXPERIMENTS)
    q.add_argument("--runs", type=positive_int, default=5,
                   help="exml-mnist(-ablation): independent expert streams; cil-*: seeds (default: 5)")
    q.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="cil-*: run only these seeds, into the run ledger, and write no table (to share one "
                        "table's seeds among processes or machines; a later --runs K makes the table of seeds "
                        "0..K-1 from the ledger)")
    q.add_argument("--seed", type=int, default=0,
                   help="zskd-*, dfkd-*: the seed of the teacher, synthesis and student (default: 0)")
    q.add_argument("--kd-seeds", type=positive_int, default=None, metavar="K",
                   help="zskd-*: distil the student on the same DIs K times (KD seeds 0..K-1: its initialisation "
                        "and batch order) and record their mean and spread beside KD seed 0 (default: 1)")
    q.add_argument("--synth-tv-l2", type=float, default=None, metavar="W",
                   help="zskd-*: the weight of the DIs' l2 total-variation prior in place of the networks' (0: the "
                        "paper's prior-free DIs); writes <experiment>_tv<W>.* (default: the networks')")
    q.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                   help="paper (Appendix A-B, hours per run on 2 CPU cores), demo, or smoke (default: paper; "
                        "demo for exml-mnist-ablation)")
    q.add_argument("--variants", default=None,
                   help="exml-mnist-ablation: comma-separated subset of its variants (default: all)")
    q.add_argument("--test-seeds", default=None, metavar="S,S,...",
                   help="exml-mnist-ablation: fresh expert streams on which the variant selected on validation "
                        "data is scored on the test set (default: 100,101,102,103,104; none: skip)")
    q.add_argument("--scenarios", default="split_mnist,joint_mnist", help="(default: split_mnist,joint_mnist)")
    q.add_argument("--networks", choices=sorted(ZSKD_NETWORKS), default=None,
                   help="zskd-*: the teacher and student; paper: the Data Impressions paper's LeNet-5 / "
                        "LeNet-5-Half (61 706 / 35 820 parameters, inputs resized to 32 in [0, 1]); exml: the ExML "
                        "paper's LeNet-5 and its every-layer half (the records made before; default: paper)")
    q.add_argument("--methods", default=None,
                   help=f"dfkd-mnist: comma-separated subset of {','.join(DFKD_METHODS)} (default: all)")
    q.add_argument("--kd-samples", choices=KD_SAMPLES, default=None,
                   help="dfkd-mnist: a generator's KD student learns from a fixed class-balanced draw of the "
                        "budget's n inputs, or from fresh delegator samples at every KD step (default: fixed)")
    q.add_argument("--recipe", choices=DFKD_RECIPES, default=None,
                   help="dfkd-mnist: ours (every method on the ExML LeNet-5 pair, one KD recipe) or public (DAFL and "
                        "DFAD as their public code runs them: its ReLU LeNet-5 pair, generators, optimisers, batch "
                        "and steps, each method's own student; writes dfkd_mnist*_public.*) (default: ours)")
    q.add_argument("--strategies", default=None,
                   help="comma-separated subset of Table 2's (exml-mnist) or of the class-incremental ones (cil-*) "
                        "(default: all)")
    q.add_argument("--out", default=None, metavar="DIR",
                   help="experts, runs, teachers and DIs (resumable; default: runs/reproduce/<experiment>)")
    q.add_argument("--results", default="benches/results", metavar="DIR", help="(default: benches/results)")
    q.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    q.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files")
    q.add_argument("--progress", action="store_true", help="progress bars (default: one line per run)")
    q.set_defaults(func=_reproduce, subparser=q)


def _reproduce(args) -> int:
    device = resolve_device(args.device)
    out = args.out or f"runs/reproduce/{args.experiment}"
    if args.methods is not None and args.experiment != "dfkd-mnist":
        raise UsageError("--methods is for dfkd-mnist")
    if args.kd_samples is not None and args.experiment != "dfkd-mnist":
        raise UsageError("--kd-samples is for dfkd-mnist")
    if args.recipe is not None and args.experiment != "dfkd-mnist":
        raise UsageError("--recipe is for dfkd-mnist")
    if args.networks is not None and not args.experiment.startswith("zskd-"):
        raise UsageError("--networks is for zskd-mnist and zskd-fmnist")
    for flag, value in (("--kd-seeds", args.kd_seeds), ("--synth-tv-l2", args.synth_tv_l2)):
        if value is not None and not args.experiment.startswith("zskd-"):
            raise UsageError(f"{flag} is for zskd-mnist and zskd-fmnist")
    if args.seeds is not None and args.experiment not in CIL_EXPERIMENTS:
        raise UsageError(f"--seeds is for {' and '.join(CIL_EXPERIMENTS)}")
    if args.experiment == "dfkd-mnist":
        if args.variants is not None or args.test_seeds is not None or args.strategies is not None:
            raise UsageError("--variants, --test-seeds and --strategies are not for dfkd-mnist (it takes --methods)")
        budget = args.budget or "paper"
        if budget not in DFKD_BUDGETS:
            raise UsageError(f"--budget for dfkd-mnist: one of {', '.join(DFKD_BUDGETS)}")
        recipe = args.recipe or "ours"
        allowed = DFKD_METHODS if recipe == "ours" else tuple(PUBLIC_DFKD["fits"])
        methods = None if args.methods is None else tuple(m for m in args.methods.split(",") if m)
        if methods is not None and (not methods or any(m not in allowed for m in methods)):
            raise UsageError(f"--methods: comma-separated names among {', '.join(allowed)}"
                             + (" (--recipe public)" if recipe == "public" else "") + f"; got {args.methods!r}")
        if recipe == "public" and args.kd_samples is not None:
            raise UsageError("--kd-samples is for --recipe ours: the public recipe's students learn inside the fit")
        rec = reproduce_dfkd(args.experiment, budget=budget, seed=args.seed, methods=methods,
                             kd_samples=args.kd_samples or "fixed", recipe=recipe, out=out,
                             results=args.results, device=device, data_root=args.data_root, progress=args.progress)
        for r in rec["rows"]:
            print(f"{r['method']:18s} synthesis {r['synthesis_s']:7.0f} s  student validation "
                  f"{r['student']['validation']:6.2f}  test {r['student']['test']:6.2f}"
                  + ("  (selected)" if r["method"] == rec["selected"] else ""))
        return 0
    if args.experiment in CIL_EXPERIMENTS:
        if args.variants is not None or args.test_seeds is not None:
            raise UsageError("--variants and --test-seeds are for exml-mnist-ablation")
        budget = args.budget or "paper"
        if budget not in CIL_BUDGETS:
            raise UsageError(f"--budget for {args.experiment}: one of {', '.join(CIL_BUDGETS)}")
        rows = reproduce_cil(
            args.experiment, runs=args.runs, budget=budget,
            seeds=None if args.seeds is None else _seed_list(args.seeds, "--seeds"),
            strategies=None if args.strategies is None else tuple(s for s in args.strategies.split(",") if s),
            out=args.out or "runs/reproduce/cil", results=args.results, device=device, data_root=args.data_root,
            progress=args.progress)
        for r in rows:
            print(f"{r['strategy']:20s} final {r['final']['mean']:6.2f}  average incremental "
                  f"{r['average_incremental']['mean']:6.2f}  ({r['runs']} runs, keeps data: "
                  f"{'yes' if r['keeps_data'] else 'no'})")
        return 0
    if args.experiment == "exml-mnist-ablation":
        if args.strategies is not None:
            raise UsageError("--strategies is for exml-mnist; exml-mnist-ablation takes --variants")

        if args.test_seeds is None:
            test_seeds = TEST_SEEDS
        elif args.test_seeds.strip().lower() == "none":
            test_seeds = ()
        else:
            test_seeds = _seed_list(args.test_seeds, "--test-seeds", none_ok=True)
        res = ablate_exml_mnist(
            runs=args.runs, budget=args.budget or "demo", out=out, results=args.results, device=device,
            variants=None if args.variants is None else tuple(v for v in args.variants.split(",") if v),
            test_seeds=test_seeds, data_root=args.data_root, progress=args.progress)
        for r in res["rows"]:
            print(f"{r['variant']:24s} validation {r['mean']:6.2f} ± {r['std']:5.2f}  ({r['runs']} runs)")
        if res["selected"] is not None:
            t = res["test"]
            print(f"selected {res['selected']['variant']}" + ("" if t is None else
                  f": test {t['mean']:.2f} ± {t['std']:.2f} over seeds {t['seeds']}"))
        return 0
    if args.variants is not None or args.test_seeds is not None:
        raise UsageError("--variants and --test-seeds are for exml-mnist-ablation")
    args.budget = args.budget or "paper"
    if args.experiment != "exml-mnist":
        if args.budget not in ZSKD_BUDGETS:
            raise UsageError(f"--budget for {args.experiment}: one of {', '.join(ZSKD_BUDGETS)}")
        reproduce_zskd(args.experiment, budget=args.budget, seed=args.seed, kd_seeds=args.kd_seeds or 1,
                       networks=args.networks or "paper", synth_tv_l2=args.synth_tv_l2,
                       out=out, results=args.results, device=device, data_root=args.data_root,
                       progress=args.progress)
        return 0
    rows = reproduce_exml_mnist(
        runs=args.runs, budget=args.budget, scenarios=tuple(s for s in args.scenarios.split(",") if s),
        strategies=None if args.strategies is None else tuple(s for s in args.strategies.split(",") if s),
        out=out, results=args.results, device=device, data_root=args.data_root, progress=args.progress)
    for r in rows:
        print(f"{r['scenario']:12s} {r['strategy']:13s} {r['mean']:6.2f} (paper {r['paper_mean']:.2f} ± "
              f"{r['paper_std']:.2f}) {'within 2 std' if r['within_2_std'] else 'outside 2 std'}")
    return 0


def _seed_list(text: str, flag: str, *, none_ok: bool = False) -> tuple[int, ...]:
    """``text`` ("3,4") as seeds: distinct ints >= 0, at least one (or none, with ``none_ok``)."""
    expected = "comma-separated distinct ints >= 0" + (" or none" if none_ok else ", at least one")
    try:
        seeds = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: {expected}; got {text!r}") from None
    if (not seeds and not none_ok) or any(v < 0 for v in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"{flag}: {expected}; got {text!r}")
    return seeds
