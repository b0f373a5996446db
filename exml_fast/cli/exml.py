"""The ExML commands of ``exml-fast``: ``train-experts``, ``run``, ``report`` and ``demo``.

::

    exml-fast train-experts --scenario split_mnist --arch lenet5 --seed 0 --out experts/split_mnist_s0
    exml-fast run --experts experts/split_mnist_s0 --strategy mi-ed --out runs/mi_ed_s0
    exml-fast run --experts experts/split_mnist_s0 --config my_run.yaml --out runs/x --resume
    exml-fast run --scenario split_mnist --strategy lwf --out runs/lwf_s0      # class-incremental, from data
    exml-fast report runs/* --out runs/report.md
    exml-fast demo

``run`` checkpoints after every experience (atomic writes); ``--resume``
continues a killed run and ends with the same numbers as an uninterrupted
one. Budget flags override the strategy's defaults (the paper's settings
for the experts' dataset, Appendix B: MNIST, or CIFAR-10 through
``DATASET_RUN_DEFAULTS``) and a ``--config`` YAML file; a flag given on the
command line wins over the file. The class-incremental strategies (finetune,
joint, lwf) learn from a scenario's data instead of experts: their runs take
``--scenario`` (class order from ``--seed``) and train with the experts'
recipe by default.

``--strategy`` also takes a strategy defined outside the package: the name of
an installed plugin's (entry-point group ``exml_fast.strategies``) or
``package.module:name``. The options such a strategy declares are flags like
the others (``exml-fast run --strategy pkg.mod:name --help`` lists them).
"""
from __future__ import annotations

import argparse
import pathlib
import time

from exml_fast._utils.io import atomic_write
from exml_fast.cl.experts import ExpertStream, default_weights_format
from exml_fast.cl.metrics import StreamResult, plot_stream_accuracy, summary_table
from exml_fast.cl.scenarios import SCENARIOS, make_scenario, scenario_of, train_experts
from exml_fast.cl.strategies import (DATASET_RUN_DEFAULTS, RUN_OPTIONS, STRATEGIES, load_config, run_named_strategy,
                                     strategy_names, stream_arch)
from exml_fast.cl.strategies.options import parse_floats
from exml_fast.cl.strategies.registry import StrategyOptionError, load_entry_points, resolve_strategy
from exml_fast.cli.common import (UsageError, device_arg, positive_float, positive_int, resolve_device, say,
                                  torchrun_group)
from exml_fast.experiments.demo import DEMO_BUDGETS, run_demo
from exml_fast.experiments.presets import PRESETS

__all__ = ["add_commands"]


def _floats_arg(text: str) -> tuple[float, ...]:
    try:
        return parse_floats(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or a comma-separated list of them; got {text!r}") \
            from None


def _strategy_arg(text: str) -> str:
    """``--strategy``: the registered name a name, a plugin's name or ``package.module:name`` refers to."""
    try:
        return resolve_strategy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--strategy ")) from None


def _load_strategies(argv) -> None:
    """Before the run flags are made: imports the installed plugins' strategies and the module of a
    ``--strategy package.module:name`` in ``argv``, so that the options they declare become flags. An error is
    left to ``--strategy``'s parsing, which reports it."""
    load_entry_points()
    argv = list(argv or ())
    for k, arg in enumerate(argv):
        if arg == "--strategy" and k + 1 < len(argv):
            value = argv[k + 1]
        elif arg.startswith("--strategy="):
            value = arg.partition("=")[2]
        else:
            continue
        if value not in STRATEGIES:
            try:
                resolve_strategy(value)
            except ValueError:
                pass


def add_commands(sub, argv=None) -> None:
    """Adds train-experts, run, report and demo to the ``exml-fast`` subparsers ``sub``. ``argv``: the command
    line to be parsed (its ``--strategy package.module:name`` is imported first, for the flags of its
    options)."""
    _load_strategies(argv)
    t = sub.add_parser(
        "train-experts", help="train one expert per experience of a scenario (an expert stream)",
        description="Train one expert per experience of a continual-learning scenario from one shared "
                    "initialisation (Appendix A: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 32) and "
                    "write them as an expert stream. Rerunning the same command skips the experts already there.")
    t.add_argument("--scenario", choices=sorted(SCENARIOS), default="split_mnist", help="(default: split_mnist)")
    t.add_argument("--n-experiences", type=positive_int, default=None, help="experiences (default: the scenario's)")
    t.add_argument("--base-classes", type=positive_int, default=None, metavar="B",
                   help="a first experience of B classes, the others share the rest")
    t.add_argument("--arch", default="lenet5", help="expert architecture (default: lenet5)")
    t.add_argument("--epochs", type=positive_int, default=None,
                   help="default (the paper): MNIST 20 split, 100 joint; CIFAR-10 100")
    t.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (default: 0.01)")
    t.add_argument("--batch-size", type=positive_int, default=32, help="(default: 32)")
    t.add_argument("--max-train", type=positive_int, default=None, metavar="N",
                   help="train each expert on at most N samples (quick runs)")
    t.add_argument("--seed", type=int, default=0, help="class order, initialisation, batch order (default: 0)")
    t.add_argument("--weights-format", choices=("safetensors", "torch"), default=None,
                   help="expert weights file (default: safetensors when installed, else a weights-only torch file)")
    t.add_argument("--out", required=True, metavar="DIR", help="expert stream folder")
    t.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    t.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train_experts, subparser=t)

    r = sub.add_parser(
        "run", help="run a strategy over an expert stream (ExML) or a scenario's data (class-incremental; "
                    "checkpointed, resumable)",
        description="Feed the experts of a stream (--experts) — or, for the class-incremental strategies, the "
                    "tasks of a scenario with their training data (--scenario) — to a strategy one at a time, "
                    "evaluate after each, and write checkpoint.pt (every experience), result.json and plots to "
                    "--out. --resume continues a killed run. ExML defaults are the paper's settings for the "
                    "experts' dataset (Appendix B: MNIST, CIFAR-10); class-incremental ones the experts' "
                    "training recipe; flags override --config.")
    r.add_argument("--experts", default=None, metavar="DIR",
                   help="expert stream (from train-experts), for the ExML strategies")
    r.add_argument("--scenario", choices=sorted(SCENARIOS), default=None,
                   help="the scenario whose data the class-incremental strategies learn from (class order from "
                        "--seed)")
    r.add_argument("--n-experiences", type=positive_int, default=None,
                   help="--scenario: tasks (default: the scenario's)")
    r.add_argument("--max-train", type=positive_int, default=None, metavar="N",
                   help="--scenario: at most N training samples per task (quick runs)")
    r.add_argument("--base-classes", type=positive_int, default=None, metavar="B",
                   help="--scenario: a first task of B classes, the other tasks share the rest (e.g. "
                        "split_cifar100 --base-classes 50 --n-experiences 6: PyCIL's B50 Inc10)")
    r.add_argument("--strategy", type=_strategy_arg, default=None, metavar="NAME",
                   help=f"required here or in --config: one of {', '.join(strategy_names())}, an installed plugin's "
                        "(entry-point group exml_fast.strategies), or package.module:name (a module defining one)")
    r.add_argument("--out", required=True, metavar="DIR", help="run folder")
    r.add_argument("--config", default=None, metavar="YAML", help="run options (keys: the flags below, with _)")
    r.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named strategy and options under --config and the flags; ed-best: the Split MNIST "
                        "variant the ablation selected on validation data (model inversion of BatchNorm experts, "
                        "train them with --arch lenet5_bn)")
    for key, (typ, _default, text) in RUN_OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        if typ is bool:
            r.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            conv = {int: positive_int, float: float, str: str, tuple: _floats_arg}[typ]
            r.add_argument(flag, type=conv, default=None, help=text)
    r.add_argument("--seed", type=int, default=None, help="seed of every draw of the run (default: 0)")
    r.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    r.add_argument("--stop-after", type=positive_int, default=None, metavar="K",
                   help="stop after K experiences (resume later)")
    r.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files")
    r.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=_run, subparser=r)

    p = sub.add_parser("report", help="tables and plots from finished runs",
                       description="Read result.json of each run folder; print the stream-accuracy summary "
                                   "(mean ± std over seeds) and each run's accuracy matrix; write --out.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or result.json files)")
    p.add_argument("--out", default=None, metavar="MD", help="also write the report (Markdown) and plots beside it")
    p.set_defaults(func=_report, subparser=p)
    d = sub.add_parser("demo", help="Split MNIST: 5 LeNet-5 experts, every strategy at a reduced budget",
                       description="Train (once) 5 LeNet-5 experts on Split MNIST, run the ED strategies and the "
                                   "baselines at a reduced budget, then the class-incremental strategies on the "
                                   "same tasks' data, print the tables, write plots.")
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="(default: runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="(default: 0)")
    d.add_argument("--device", type=device_arg, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    d.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files")
    d.add_argument("--progress", action="store_true", help="progress bars (default: one line per experience)")
    d.add_argument("--budget", choices=DEMO_BUDGETS, default="demo",
                   help="demo: the reduced budget of the getting-started guide's figures; smoke: 500 images per "
                        "experience and a few steps, seconds, to check the pipeline "
                        "(under <out>/smoke) (default: demo)")
    d.set_defaults(func=_demo, subparser=d)


def _scenario_from_args(args, seed: int):
    """The scenario ``--scenario`` names, with ``--n-experiences``, ``--max-train`` and ``--base-classes`` when
    given (else the scenario's defaults), the class order from ``seed``."""
    kw = {"seed": seed, "root": args.data_root}
    for flag, key in (("n_experiences", "n_experiences"), ("max_train", "max_train_per_experience"),
                      ("base_classes", "base_classes")):
        if getattr(args, flag) is not None:
            kw[key] = getattr(args, flag)
    return make_scenario(args.scenario, **kw)


def _train_experts(args) -> int:
    device = resolve_device(args.device)
    fmt = args.weights_format or default_weights_format()
    scenario = _scenario_from_args(args, args.seed)
    print(f"[scenario] {scenario.name}: {len(scenario.experiences)} experiences, classes "
          f"{[list(e.classes) for e in scenario.experiences]}")
    t0 = time.perf_counter()
    stream = train_experts(scenario, args.out, arch=args.arch, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, device=device, progress=not args.no_progress,
                           weights_format=fmt)
    for j, expert in enumerate(stream):
        acc = expert.meta.get("test_accuracy_head")
        print(f"[expert {j}] classes {list(expert.classes)}"
              + (f": test accuracy on its classes {acc:.4f}" if acc is not None else ""))
    print(f"[save] {args.out} ({len(stream)} experts, {time.perf_counter() - t0:.1f} s)")
    return 0


def _run(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank joins the group (gloo on the CPU, NCCL on cuda:LOCAL_RANK)
    and the run is sharded over the ranks (exml_fast.cl.engine.run_stream); rank 0 prints and writes."""
    with torchrun_group(resolve_device(args.device)) as device:
        return _run_on(args, device)


def _run_on(args, device) -> int:
    from exml_fast._utils.dist import rank_and_world

    show = say if rank_and_world()[0] == 0 else (lambda *_: None)
    try:
        config = load_config(args.config) if args.config else {}
    except ValueError as e:  # malformed file, unknown key, wrong type: a usage error like a bad flag
        raise UsageError(str(e)) from None
    preset = {"options": {}}
    if args.preset is not None:
        preset = PRESETS[args.preset]
    options = {k: config.get(k, preset["options"].get(k)) for k in RUN_OPTIONS}
    options.update({k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k) is not None})
    strategy_name = args.strategy or config.get("strategy") or preset.get("strategy")
    if strategy_name is None:
        raise UsageError("--strategy is required (or 'strategy:' in --config)")
    seed = args.seed if args.seed is not None else config.get("seed", 0)
    data = STRATEGIES[strategy_name].data
    if data:
        if args.experts is not None or args.preset is not None:
            raise UsageError(f"--strategy {strategy_name} learns from a scenario's data: pass --scenario, not "
                             "--experts or --preset")
        if args.scenario is None:
            raise UsageError(f"--strategy {strategy_name} learns from a scenario's data: --scenario is required")
        scenario = _scenario_from_args(args, seed)
        if scenario.multi_task:
            raise UsageError(f"--scenario {args.scenario}: the class-incremental strategies learn one head without "
                             "task labels; pick a scenario without _mt")
        return _run_named(args, strategy_name, None, scenario, options, seed, device, show)
    if args.experts is None:
        raise UsageError(f"--strategy {strategy_name} learns from experts: --experts is required")
    if any(v is not None for v in (args.scenario, args.n_experiences, args.max_train, args.base_classes)):
        raise UsageError("--scenario, --n-experiences, --max-train and --base-classes are for the class-incremental "
                         "strategies; an ExML run takes its scenario from --experts")
    stream = ExpertStream(args.experts)
    scenario = scenario_of(stream, root=args.data_root)
    if args.preset is not None:
        arch = stream_arch(stream)
        show(f"[preset] {args.preset}: {preset['strategy']} with {preset['options']}")
        if arch != preset["arch"]:
            show(f"[preset] note: {args.preset} was chosen with {preset['arch']} experts; these are {arch}")
    if scenario.dataset in DATASET_RUN_DEFAULTS:
        show(f"[run] {scenario.dataset} defaults (the ExML paper's Appendix B) under the options given: "
              f"{DATASET_RUN_DEFAULTS[scenario.dataset]}")
    return _run_named(args, strategy_name, stream, scenario, options, seed, device, show)


def _run_named(args, strategy_name, stream, scenario, options, seed, device, show=say) -> int:
    what = f"{len(stream)} experts" if stream is not None else f"{len(scenario)} tasks of its data"
    show(f"[run] {strategy_name} on {scenario.name} ({what}), seed {seed}, {device}")
    try:
        result = run_named_strategy(strategy_name, stream, scenario, options=options, seed=seed, device=device,
                                    out=args.out, resume=args.resume, stop_after=args.stop_after,
                                    plots=not args.no_plots, progress=not args.no_progress, data_root=args.data_root,
                                    log=show)
    except StrategyOptionError as e:  # an option the strategy does not read: a usage error like a bad flag
        raise UsageError(str(e)) from None
    if result.meta.get("complete"):
        show(f"[result] {strategy_name}: final stream accuracy {100 * result.final_stream_accuracy:.2f} %, "
              f"forgetting {100 * result.average_forgetting:.2f} (max over history), "
              f"{100 * result.avalanche_forgetting:.2f} (Avalanche's), BWT {100 * result.bwt:.2f}")
        show(f"[save] {pathlib.Path(args.out) / 'result.json'}")
    else:
        show(f"[stop] after {len(result.acc_matrix)} experiences; continue with --resume")
    return 0


def _load_results(paths):
    results = []
    for p in paths:
        p = pathlib.Path(p)
        f = p / "result.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"report: no result.json in {p} (is the run finished?)")
        results.append(StreamResult.load_json(f))
    return results


def _report(args) -> int:
    results = _load_results(args.runs)
    text = "## Stream accuracy\n\n" + summary_table(results) + "\n"
    for path, r in zip(args.runs, results):
        text += f"\n### {r.strategy} (seed {r.seed}) — {path}\n\n{r.to_markdown()}\n"
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        atomic_write(out, lambda f: f.write(text.encode()))
        plot_stream_accuracy(results, out.with_suffix(".png"))
        print(f"[save] {out}, {out.with_suffix('.png')}")
    return 0


def _demo(args) -> int:
    run_demo(out=args.out, seed=args.seed, device=resolve_device(args.device), data_root=args.data_root,
             progress=args.progress, budget=args.budget)
    return 0
