"""The ExML commands of ``exml-fast``: ``train-experts``, ``run``, ``report`` and ``demo``.

::

    exml-fast train-experts --scenario split_mnist --arch lenet5 --seed 0 --out experts/split_mnist_s0
    exml-fast run --experts experts/split_mnist_s0 --strategy mi-ed --out runs/mi_ed_s0
    exml-fast run --experts experts/split_mnist_s0 --config my_run.yaml --out runs/x --resume
    exml-fast report runs/* --out runs/report.md
    exml-fast demo

``run`` checkpoints after every experience (atomic writes); ``--resume``
continues a killed run and ends with the same numbers as an uninterrupted
one. Budget flags override the strategy's defaults (the paper's settings
for the experts' dataset, Appendix B: MNIST, or CIFAR-10 through
``DATASET_RUN_DEFAULTS``) and a ``--config`` YAML file; a flag given on the
command line wins over the file.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
import warnings
from typing import Any

import torch

__all__ = ["DATASET_RUN_DEFAULTS", "STRATEGY_CHOICES", "add_commands", "build_strategy", "load_config", "run_defaults"]

#: --strategy values: the ED variants by data source, then the baselines.
STRATEGY_CHOICES = ("mi-ed", "di-ed", "aux-ed", "replay-ed", "oracle", "ensemble-avg", "min-entropy", "param-avg")
_ED = {"mi-ed": "model-inversion", "di-ed": "data-impressions", "aux-ed": "auxiliary", "replay-ed": "real-replay"}

#: Run options: name -> (type, default, help). Defaults are the paper's MNIST settings (Appendix B); CIFAR-10 runs
#: take DATASET_RUN_DEFAULTS over them.
RUN_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "buffer_size": (int, 5000, "buffer capacity N (default: 5000)"),
    "iterations": (int, 30000, "distillation steps per experience (default: 30000)"),
    "lr": (float, 0.01, "distillation SGD learning rate (default: 0.01)"),
    "momentum": (float, 0.0, "distillation SGD momentum (default: 0, the ExML reference code's plain SGD; "
                             "records before this default changed ran with 0.9)"),
    "batch_size": (int, 32, "distillation minibatch (default: 32)"),
    "lambda_ce": (float, 1.0, "weight of the cross-entropy in L_ED (default: 1.0)"),
    "target_mode": (str, "slice", "ED target: slice (reference code) or per_sample (paper Eq. 8)"),
    "normalize": (str, "center", "logit normalisation: none, center or standardize (default: center)"),
    "augment": (bool, True, "per-sample pad-crop augmentation of distillation minibatches (default: on)"),
    "flip": (bool, False, "per-sample horizontal flips in the distillation augmentation (default: off; on for "
                          "CIFAR-10)"),
    "synth_iterations": (int, 3000, "optimisation steps per synthesis batch, MI/DI (default: 3000)"),
    "synth_batch_size": (int, 256, "inputs optimised together, MI/DI (default: 256)"),
    "synth_lr": (float, 0.01, "Adam learning rate of the synthetic inputs (default: 0.01)"),
    "temperature": (float, None, "generator temperature (default: MI 2, DI 20)"),
    "beta": (tuple, (10.0,), "Data Impressions Dirichlet concentration scale, or a comma-separated mixture "
                             "alternated per class, e.g. 1,0.1 (default: 10)"),
    "bn_weight": (float, 1.0, "mi-ed/di-ed: weight of the BatchNorm-statistic term (default: 1.0, the paper's; "
                              "only experts with BatchNorm have statistics to match)"),
    "bn_form": (str, "sq_std", "mi-ed/di-ed: form of the BatchNorm-statistic term: sq_std (the ExML paper's "
                               "squared mean and std gaps; the default) or l2 (DeepInversion's un-squared norms of "
                               "the mean and variance gaps; records before this default changed ran with it); see "
                               "exml_fast.reference.bn_stats"),
    "first_bn_multiplier": (float, 1.0, "mi-ed/di-ed: factor of the first BN layer's term (default: 1)"),
    "blur_weight": (float, 1e-3, "mi-ed/di-ed: blur prior weight on the mean per-image ||x - G3*x||^2 (default: "
                                 "1e-3, the paper's, which was tuned for its code's per-image non-squared 7x7 norm, "
                                 "about 20x smaller at N(0, 1) inputs: the same weight pushes harder here)"),
    "l2_sq_weight": (float, 1e-3, "mi-ed/di-ed: squared-L2 prior weight (default: 1e-3)"),
    "competition_weight": (float, 0.0, "mi-ed/di-ed: Adaptive DeepInversion against the learner, the weight of "
                                       "1 - JS(expert, learner) from the second expert on (default: 0, off)"),
    "aux_dataset": (str, None, "aux-ed: the unrelated dataset (default: the other of mnist / fashion-mnist)"),
}


#: Run options by the scenario's dataset, over the RUN_OPTIONS defaults (the MNIST settings); given options win.
#: CIFAR-10: the ExML paper's Appendix B.2 — distillation SGD lr 0.1, 50000 steps of 32; MI/DI 500 Adam steps
#: at lr 0.1 on batches of 1024, BNS 0, blur 0.01, weight decay (squared L2) 1e-4, τ 2 (DI too); flips in
#: the distillation augmentation (§4: "horizontal flip" for natural images). Its experts train 100 epochs
#: (exml_fast.cl.scenarios.default_expert_epochs); its auxiliary data is ImageNet, which is not loadable here.
DATASET_RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": {"iterations": 50000, "lr": 0.1, "batch_size": 32, "synth_iterations": 500, "synth_lr": 0.1,
                "synth_batch_size": 1024, "bn_weight": 0.0, "blur_weight": 0.01, "l2_sq_weight": 1e-4,
                "temperature": 2.0, "flip": True},
}


def run_defaults(dataset: str) -> dict[str, Any]:
    """The default of every run option for a scenario of ``dataset``: RUN_OPTIONS' with DATASET_RUN_DEFAULTS'."""
    return {**{k: v[1] for k, v in RUN_OPTIONS.items()}, **DATASET_RUN_DEFAULTS.get(dataset, {})}


def _floats(value) -> tuple[float, ...]:
    """A number, a list of numbers or a comma-separated string of them, each > 0, as a tuple of floats."""
    if isinstance(value, str):
        items = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items or any(isinstance(v, bool) for v in items):
        raise ValueError(f"expected numbers > 0; got {value!r}")
    out = tuple(float(v) for v in items)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"expected numbers > 0; got {value!r}")
    return out


def _floats_arg(text: str) -> tuple[float, ...]:
    try:
        return _floats(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or a comma-separated list of them; got {text!r}") \
            from None


def load_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a YAML (or JSON) run config: a mapping of RUN_OPTIONS names (and ``strategy``, ``seed``)."""
    path = pathlib.Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") \
                from None
    else:
        try:
            import yaml
        except ImportError:
            raise ImportError("--config: reading YAML needs PyYAML (pip install pyyaml), or pass a .json file") \
                from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1}: {e.problem})" if mark is not None else ""
            raise ValueError(f"--config {path}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value; got {type(data).__name__}")
    allowed = set(RUN_OPTIONS) | {"strategy", "seed"}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise ValueError(f"--config {path}: unknown option {key!r}; allowed: {', '.join(sorted(allowed))}")
        if name == "strategy" and value not in STRATEGY_CHOICES:
            raise ValueError(f"--config {path}: strategy must be one of {', '.join(STRATEGY_CHOICES)}; got {value!r}")
        if name in RUN_OPTIONS and value is not None and RUN_OPTIONS[name][0] is tuple:
            try:
                value = _floats(value)
            except (TypeError, ValueError):
                raise ValueError(f"--config {path}: {key} must be a number or a list of numbers > 0; got {value!r}") \
                    from None
        elif name in RUN_OPTIONS and value is not None:
            typ = RUN_OPTIONS[name][0]
            if typ is bool and not isinstance(value, bool) or typ is int and (isinstance(value, bool) or
                                                                               not isinstance(value, int)) \
                    or typ is float and (isinstance(value, bool) or not isinstance(value, (int, float))) \
                    or typ is str and not isinstance(value, str):
                raise ValueError(f"--config {path}: {key} must be a {typ.__name__}; got {value!r}")
            value = typ(value)
        out[name] = value
    return out


# -- building a strategy --------------------------------------------------------------------


def stream_arch(stream) -> str:
    """The architecture of a stream's experts (the stream's metadata, else its first expert's entry)."""
    return stream.meta.get("arch", stream.entries[0].get("arch"))


def build_learner(stream, seed: int) -> torch.nn.Module:
    """A fresh model of the experts' architecture, initialised from ``seed`` (the global RNG left untouched)."""
    from exml_fast.models import build_model
    from exml_fast.cl.strategies import derive_seed

    arch = stream_arch(stream)
    arch_kwargs = stream.meta.get("arch_kwargs") or stream[0].arch_kwargs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "learner-init"))
        return build_model(arch, **arch_kwargs)


def build_strategy(name: str, stream, scenario, *, options: dict[str, Any], seed: int, device: torch.device,
                   progress: bool, data_root=None):
    """The strategy ``name`` (one of STRATEGY_CHOICES) with ``options`` (RUN_OPTIONS names) over the defaults
    of the scenario's dataset (:func:`run_defaults`: the MNIST settings, CIFAR-10's Appendix B.2)."""
    from exml_fast.cl import strategies as S
    from exml_fast.synth import AuxiliaryData, DataImpressions, ModelInversion

    opt = run_defaults(scenario.dataset)
    opt.update({k: v for k, v in options.items() if v is not None})
    if name in ("oracle", "ensemble-avg", "min-entropy"):
        cls = {"oracle": S.OracleEnsemble, "ensemble-avg": S.EnsembleAverage, "min-entropy": S.MinEntropyEnsemble}
        return cls[name](device=device, seed=seed, progress=progress)
    if name == "param-avg":
        return S.ParameterAverage(device=device, seed=seed, progress=progress)
    if name not in _ED:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGY_CHOICES)}; got {name!r}")
    synth_common = dict(iterations=opt["synth_iterations"], batch_size=opt["synth_batch_size"], lr=opt["synth_lr"],
                        bn_weight=opt["bn_weight"], first_bn_multiplier=opt["first_bn_multiplier"],
                        bn_form=opt["bn_form"],
                        blur_weight=opt["blur_weight"], l2_sq_weight=opt["l2_sq_weight"])
    if opt["competition_weight"]:
        # Adaptive DeepInversion: the generator swaps "learner" for the learner when it has seen an expert.
        synth_common.update(competitor="learner", competition_weight=opt["competition_weight"])
    if name == "mi-ed":
        generator = S.SynthesizerGenerator(ModelInversion, **synth_common, temperature=opt["temperature"] or 2.0)
    elif name == "di-ed":
        beta = tuple(opt["beta"]) if isinstance(opt["beta"], (tuple, list)) else (opt["beta"],)
        generator = S.SynthesizerGenerator(DataImpressions, **synth_common, beta=beta[0] if len(beta) == 1 else beta,
                                           temperature=opt["temperature"] or 20.0)
    elif name == "aux-ed":
        from exml_fast.data import DATASETS, auxiliary_inputs

        own = scenario.dataset
        if own not in DATASETS and opt["aux_dataset"] is None:
            raise ValueError(f"aux-ed: the paper's auxiliary data for {own} is ImageNet, which exml_fast cannot "
                             f"load; pass --aux-dataset (one of {', '.join(DATASETS)})")
        aux = opt["aux_dataset"] or next((d for d in DATASETS if d != own), None)
        if aux is None or aux not in DATASETS or aux == own:
            raise ValueError(f"aux-ed: --aux-dataset must be one of {', '.join(DATASETS)} other than the "
                             f"scenario's {own!r}; got {aux!r}")
        data = auxiliary_inputs(aux, input_shape=scenario.input_shape, mean=scenario.mean, std=scenario.std,
                                root=data_root)
        generator = S.SynthesizerGenerator(AuxiliaryData, data=data, batch_size=opt["synth_batch_size"])
    else:
        generator = S.RealReplay(scenario)
    return S.ExModelDistillation(
        build_learner(stream, seed), generator=generator, buffer_size=opt["buffer_size"],
        iterations=opt["iterations"], lr=opt["lr"], momentum=opt["momentum"], batch_size=opt["batch_size"],
        lambda_ce=opt["lambda_ce"], target_mode=opt["target_mode"], normalize=opt["normalize"],
        augment=opt["augment"], flip=opt["flip"], seed=seed, device=device, progress=progress)


def run_named_strategy(name: str, stream, scenario, *, options: dict[str, Any], seed: int, device: torch.device,
                       out, resume: bool | None = None, stop_after: int | None = None, plots: bool = True,
                       progress: bool = False, data_root=None, log=None):
    """Builds strategy ``name`` (:func:`build_strategy`) and runs it over ``stream`` (:func:`run_stream`).

    ``resume`` None: continue the run in ``out`` when it holds a checkpoint, else start it.
    """
    from exml_fast.cl.engine import CHECKPOINT, run_stream

    if resume is None:
        resume = (pathlib.Path(out) / CHECKPOINT).exists()
    with warnings.catch_warnings():
        # LeNet-5 experts have no BatchNorm: the synthesizers say so once per expert; a run needs no reminder.
        warnings.filterwarnings("ignore", message=".*has no BatchNorm layer.*")
        strategy = build_strategy(name, stream, scenario, options=options, seed=seed, device=device,
                                  progress=progress, data_root=data_root)
        return run_stream(strategy, stream, scenario, out=out, resume=resume, stop_after=stop_after, plots=plots,
                          progress=progress, log=log)


def scenario_of(stream, *, root=None):
    """Rebuilds the scenario an expert stream was trained on, from the stream's metadata.

    Checks that the rebuilt scenario has the experiences (classes, task labels,
    sizes) the stream records, so a changed dataset or code cannot pass unseen.
    """
    from exml_fast.cl.scenarios import make_scenario

    desc = stream.meta.get("scenario")
    if not isinstance(desc, dict) or "name" not in desc or not isinstance(desc.get("kwargs"), dict):
        raise ValueError(f"the expert stream {stream.path} does not say which scenario it was trained on "
                         "(stream.json: meta.scenario.name / kwargs)")
    scenario = make_scenario(desc["name"], root=root, **desc["kwargs"])
    if scenario.describe()["experiences"] != desc.get("experiences"):
        raise ValueError(f"the scenario rebuilt for {stream.path} ({desc['name']}, {desc['kwargs']}) does not match "
                         "the experiences recorded with its experts (classes, task labels or sizes differ)")
    return scenario


# -- commands -------------------------------------------------------------------------------


def add_commands(sub) -> None:
    """Adds train-experts, run, report and demo to the ``exml-fast`` subparsers ``sub``."""
    from exml_fast.cli import _device as dev
    from exml_fast.cli import _positive_float, _positive_int

    t = sub.add_parser(
        "train-experts", help="train one expert per experience of a scenario (an expert stream)",
        description="Train one expert per experience of a continual-learning scenario from one shared "
                    "initialisation (Appendix A: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 32) and "
                    "write them as an expert stream. Rerunning the same command skips the experts already there.")
    from exml_fast.cl.scenarios import SCENARIOS

    t.add_argument("--scenario", choices=sorted(SCENARIOS), default="split_mnist", help="(default: split_mnist)")
    t.add_argument("--n-experiences", type=_positive_int, default=None, help="experiences (default: the scenario's)")
    t.add_argument("--arch", default="lenet5", help="expert architecture (default: lenet5)")
    t.add_argument("--epochs", type=_positive_int, default=None,
                   help="default (the paper): MNIST 20 split, 100 joint; CIFAR-10 100")
    t.add_argument("--lr", type=_positive_float, default=0.01, help="SGD learning rate (default: 0.01)")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="(default: 32)")
    t.add_argument("--max-train", type=_positive_int, default=None, metavar="N",
                   help="train each expert on at most N samples (quick runs)")
    t.add_argument("--seed", type=int, default=0, help="class order, initialisation, batch order (default: 0)")
    t.add_argument("--weights-format", choices=("safetensors", "torch"), default=None,
                   help="expert weights file (default: safetensors when installed, else a weights-only torch file)")
    t.add_argument("--out", required=True, metavar="DIR", help="expert stream folder")
    t.add_argument("--device", type=dev, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    t.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train_experts, subparser=t)

    r = sub.add_parser(
        "run", help="run an ExML strategy over an expert stream (checkpointed, resumable)",
        description="Feed the experts of a stream to a strategy one at a time, evaluate after each, and write "
                    "checkpoint.pt (every experience), result.json and plots to --out. --resume continues a "
                    "killed run. Defaults are the paper's settings for the experts' dataset (Appendix B: MNIST, "
                    "CIFAR-10); flags override --config.")
    r.add_argument("--experts", required=True, metavar="DIR", help="expert stream (from train-experts)")
    r.add_argument("--strategy", choices=STRATEGY_CHOICES, default=None, help="required here or in --config")
    r.add_argument("--out", required=True, metavar="DIR", help="run folder")
    r.add_argument("--config", default=None, metavar="YAML", help="run options (keys: the flags below, with _)")
    from exml_fast.experiments.ablation import PRESETS

    r.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named strategy and options under --config and the flags; ed-best: the best Split "
                        "MNIST variant of the ablation (model inversion of BatchNorm experts, train them with "
                        "--arch lenet5_bn)")
    for key, (typ, default, text) in RUN_OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        if typ is bool:
            r.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            conv = {int: _positive_int, float: float, str: str, tuple: _floats_arg}[typ]
            r.add_argument(flag, type=conv, default=None, help=text)
    r.add_argument("--seed", type=int, default=None, help="seed of every draw of the run (default: 0)")
    r.add_argument("--device", type=dev, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    r.add_argument("--stop-after", type=_positive_int, default=None, metavar="K",
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

    q = sub.add_parser("reproduce", help="reproduce a paper table (resumable) and record it in benches/results",
                       description="Reproduce a published table with one command. exml-mnist: the Ex-Model CL "
                                   "paper's Table 2, MNIST columns (Split MNIST NC and Joint MNIST, every strategy), "
                                   "over --runs independent expert streams; zskd-mnist / zskd-fmnist: zero-shot KD "
                                   "from 24000 / 48000 Data Impressions (LeNet-5 -> LeNet-5-Half); "
                                   "exml-mnist-ablation: the Ex-Model Distillation ablation on Split MNIST. Writes "
                                   "<results>/<experiment>.{json,md} (<experiment>_<budget>.* for a reduced "
                                   "budget). Rerun to resume.")
    from exml_fast.experiments.reproduce import BUDGETS, EXPERIMENTS

    q.add_argument("experiment", choices=EXPERIMENTS)
    q.add_argument("--runs", type=_positive_int, default=5,
                   help="exml-mnist(-ablation): independent expert streams (default: 5)")
    q.add_argument("--seed", type=int, default=0, help="zskd-*: the seed of the teacher, DIs and student (default: 0)")
    q.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                   help="paper (Appendix A-B, hours per run on 2 CPU cores), demo, or smoke (default: paper; "
                        "demo for exml-mnist-ablation)")
    q.add_argument("--variants", default=None,
                   help="exml-mnist-ablation: comma-separated subset of its variants (default: all)")
    q.add_argument("--test-seeds", default=None, metavar="S,S,...",
                   help="exml-mnist-ablation: fresh expert streams on which the variant selected on validation "
                        "data is scored on the test set (default: 100,101,102,103,104; none: skip)")
    q.add_argument("--scenarios", default="split_mnist,joint_mnist", help="(default: split_mnist,joint_mnist)")
    q.add_argument("--strategies", default=None, help="comma-separated subset of Table 2's (default: all)")
    q.add_argument("--out", default=None, metavar="DIR",
                   help="experts, runs, teachers and DIs (resumable; default: runs/reproduce/<experiment>)")
    q.add_argument("--results", default="benches/results", metavar="DIR", help="(default: benches/results)")
    q.add_argument("--device", type=dev, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    q.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files")
    q.add_argument("--progress", action="store_true", help="progress bars (default: one line per run)")
    q.set_defaults(func=_reproduce, subparser=q)

    d = sub.add_parser("demo", help="Split MNIST: 5 LeNet-5 experts, every strategy at a reduced budget",
                       description="Train (once) 5 LeNet-5 experts on Split MNIST, run the ED strategies and the "
                                   "baselines at a reduced budget, print the stream-accuracy table, write plots.")
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="(default: runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="(default: 0)")
    d.add_argument("--device", type=dev, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    d.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files")
    d.add_argument("--progress", action="store_true", help="progress bars (default: one line per experience)")
    d.set_defaults(func=_demo, subparser=d)


def _train_experts(args) -> int:
    from exml_fast.cli import _resolve_device
    from exml_fast.cl.experts import default_weights_format
    from exml_fast.cl.scenarios import make_scenario, train_experts

    device = _resolve_device(args.device)
    fmt = args.weights_format or default_weights_format()
    kw = {"seed": args.seed, "root": args.data_root}
    if args.max_train is not None:
        kw["max_train_per_experience"] = args.max_train
    if args.n_experiences is not None:
        kw["n_experiences"] = args.n_experiences
    scenario = make_scenario(args.scenario, **kw)
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
    from exml_fast.cli import _UsageError, _resolve_device
    from exml_fast.cl.experts import ExpertStream

    device = _resolve_device(args.device)
    try:
        config = load_config(args.config) if args.config else {}
    except ValueError as e:  # malformed file, unknown key, wrong type: a usage error like a bad flag
        raise _UsageError(str(e)) from None
    preset = {"options": {}}
    if args.preset is not None:
        from exml_fast.experiments.ablation import PRESETS

        preset = PRESETS[args.preset]
    options = {k: config.get(k, preset["options"].get(k)) for k in RUN_OPTIONS}
    options.update({k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k) is not None})
    strategy_name = args.strategy or config.get("strategy") or preset.get("strategy")
    if strategy_name is None:
        raise _UsageError("--strategy is required (or 'strategy:' in --config)")
    seed = args.seed if args.seed is not None else config.get("seed", 0)
    stream = ExpertStream(args.experts)
    scenario = scenario_of(stream, root=args.data_root)
    if args.preset is not None:
        arch = stream_arch(stream)
        print(f"[preset] {args.preset}: {preset['strategy']} with {preset['options']}")
        if arch != preset["arch"]:
            print(f"[preset] note: {args.preset} was chosen with {preset['arch']} experts; these are {arch}")
    if scenario.dataset in DATASET_RUN_DEFAULTS:
        print(f"[run] {scenario.dataset} defaults (the ExML paper's Appendix B) under the options given: "
              f"{DATASET_RUN_DEFAULTS[scenario.dataset]}")
    print(f"[run] {strategy_name} on {scenario.name} ({len(stream)} experts), seed {seed}, {device}")
    result = run_named_strategy(strategy_name, stream, scenario, options=options, seed=seed, device=device,
                                out=args.out, resume=args.resume, stop_after=args.stop_after, plots=not args.no_plots,
                                progress=not args.no_progress, data_root=args.data_root, log=print)
    if result.meta.get("complete"):
        print(f"[result] {strategy_name}: final stream accuracy {100 * result.final_stream_accuracy:.2f} %, "
              f"forgetting {100 * result.average_forgetting:.2f} (max over history), "
              f"{100 * result.avalanche_forgetting:.2f} (Avalanche's), BWT {100 * result.bwt:.2f}")
        print(f"[save] {pathlib.Path(args.out) / 'result.json'}")
    else:
        print(f"[stop] after {len(result.acc_matrix)} experiences; continue with --resume")
    return 0


def _load_results(paths):
    from exml_fast.cl.metrics import StreamResult

    results = []
    for p in paths:
        p = pathlib.Path(p)
        f = p / "result.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"report: no result.json in {p} (is the run finished?)")
        results.append(StreamResult.load_json(f))
    return results


def _report(args) -> int:
    from exml_fast._utils.io import atomic_write
    from exml_fast.cl.metrics import plot_stream_accuracy, summary_table

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


#: The demo's reduced budget (the paper's: buffer 5000, 3000 synthesis and 30000 distillation steps). Momentum 0.9
#: and the l2 BN form are pinned: they were the run defaults when the demo's figures were recorded.
DEMO_BUDGET = dict(buffer_size=1000, iterations=1000, synth_iterations=300, synth_batch_size=256, synth_lr=0.05,
                   momentum=0.9, bn_form="l2")
DEMO_STRATEGIES = ("mi-ed", "di-ed", "aux-ed", "param-avg", "ensemble-avg", "min-entropy", "oracle")



def _reproduce(args) -> int:
    from exml_fast.cli import _UsageError, _resolve_device
    from exml_fast.experiments.reproduce import ZSKD_BUDGETS, reproduce_exml_mnist, reproduce_zskd

    device = _resolve_device(args.device)
    out = args.out or f"runs/reproduce/{args.experiment}"
    if args.experiment == "exml-mnist-ablation":
        from exml_fast.experiments.ablation import ablate_exml_mnist

        if args.strategies is not None:
            raise _UsageError("--strategies is for exml-mnist; exml-mnist-ablation takes --variants")

        from exml_fast.experiments.ablation import TEST_SEEDS

        if args.test_seeds is None:
            test_seeds = TEST_SEEDS
        elif args.test_seeds.strip().lower() == "none":
            test_seeds = ()
        else:
            try:
                test_seeds = tuple(int(s) for s in args.test_seeds.split(",") if s.strip())
            except ValueError:
                raise _UsageError(f"--test-seeds: comma-separated ints or none; got {args.test_seeds!r}") from None
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
        raise _UsageError("--variants and --test-seeds are for exml-mnist-ablation")
    args.budget = args.budget or "paper"
    if args.experiment != "exml-mnist":
        if args.budget not in ZSKD_BUDGETS:
            raise _UsageError(f"--budget for {args.experiment}: one of {', '.join(ZSKD_BUDGETS)}")
        reproduce_zskd(args.experiment, budget=args.budget, seed=args.seed, out=out, results=args.results,
                       device=device, data_root=args.data_root, progress=args.progress)
        return 0
    rows = reproduce_exml_mnist(
        runs=args.runs, budget=args.budget, scenarios=tuple(s for s in args.scenarios.split(",") if s),
        strategies=None if args.strategies is None else tuple(s for s in args.strategies.split(",") if s),
        out=out, results=args.results, device=device, data_root=args.data_root, progress=args.progress)
    for r in rows:
        print(f"{r['scenario']:12s} {r['strategy']:13s} {r['mean']:6.2f} (paper {r['paper_mean']:.2f} ± "
              f"{r['paper_std']:.2f}) {'within 2 std' if r['within_2_std'] else 'outside 2 std'}")
    return 0


def _demo(args) -> int:
    from exml_fast.cli import _resolve_device
    from exml_fast.cl.experts import ExpertStream, default_weights_format
    from exml_fast.cl.metrics import plot_stream_accuracy, summary_table
    from exml_fast.cl.scenarios import split_mnist, train_experts

    device = _resolve_device(args.device)
    out = pathlib.Path(args.out)
    t_start = time.perf_counter()
    scenario = split_mnist(5, seed=args.seed, root=args.data_root)
    experts_dir = out / f"experts_seed{args.seed}"
    done = (experts_dir / "stream.json").exists() and len(ExpertStream(experts_dir)) == len(scenario.experiences)
    print(f"[demo] Split MNIST, classes per experience {[list(e.classes) for e in scenario.experiences]}")
    print(f"[demo] experts: {'reusing ' if done else 'training (once) '}{experts_dir}")
    t0 = time.perf_counter()
    stream = train_experts(scenario, experts_dir, arch="lenet5", epochs=2, seed=args.seed, device=device,
                           progress=args.progress, weights_format=default_weights_format())
    accs = [round(e.meta.get("test_accuracy_head", float("nan")), 4) for e in stream]
    print(f"[demo] {len(stream)} LeNet-5 experts ready ({time.perf_counter() - t0:.1f} s): test accuracy on their "
          f"own classes {accs}")
    results = []
    for name in DEMO_STRATEGIES:
        t0 = time.perf_counter()
        result = run_named_strategy(name, stream, scenario, options=DEMO_BUDGET, seed=args.seed, device=device,
                                    out=out / f"{name}_seed{args.seed}", progress=args.progress,
                                    data_root=args.data_root)
        results.append(result)
        print(f"[demo] {name:13s} final stream accuracy {100 * result.final_stream_accuracy:6.2f} % "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    table = summary_table(results)
    print("\n" + table)
    from exml_fast._utils.io import atomic_write

    atomic_write(out / "report.md", lambda f: f.write(("## Demo: Split MNIST, reduced budget "
                                                      f"{DEMO_BUDGET}\n\n" + table + "\n").encode()))
    plot_stream_accuracy(results, out / "stream_accuracy.png")
    print(f"\n[demo] wrote {out / 'report.md'}, {out / 'stream_accuracy.png'} and per-strategy plots in {out}/<strategy>_"
          f"seed{args.seed}/ ({time.perf_counter() - t_start:.0f} s in all)")
    return 0
