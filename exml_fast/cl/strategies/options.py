"""The options of a strategy run, by name: what ``exml-fast run`` turns into flags, what a ``--config`` file and
a preset may set, and their defaults per dataset (the ExML paper's Appendix B).

A strategy declares the options it reads as :class:`StrategyOption` objects (name, type, default, help) when it
registers (:func:`~exml_fast.cl.strategies.registry.register_strategy`), or names options declared already.
This module declares the options several built-in families share (the distillation and synthesis budget, the
SGD recipe); an option read by one family is declared by that family's module (``lwf``'s in
:mod:`.lwf`, ...). :data:`RUN_OPTIONS` is the table of every option declared so far, derived, for callers of
the name -> (type, default, help) mapping.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DATASET_RUN_DEFAULTS", "DATA_ONLY_OPTIONS", "DECLARED_OPTIONS", "GENERATIVE_ONLY_OPTIONS", "OPTION_TYPES",
           "RUN_OPTIONS", "StrategyOption", "declare_option", "parse_floats", "run_defaults"]

#: The types an option may have: on the command line an int flag takes a positive integer, a bool one is
#: --name / --no-name, a tuple one a comma-separated list of numbers > 0 (read as a tuple of floats).
OPTION_TYPES = (int, float, str, bool, tuple)


@dataclass(frozen=True)
class StrategyOption:
    """One option a strategy reads: ``exml-fast run --<name-with-dashes>``, a key of a ``--config`` file, and
    ``opt[name]`` in the strategy's builder.

    Args:
        name: a Python identifier in lower case (``my_weight``; the flag is ``--my-weight``).
        type: one of :data:`OPTION_TYPES` (int, float, str, bool, tuple of floats).
        default: the value the builder sees when a run gives none (None allowed: "the strategy decides").
        help: one line for ``exml-fast run --help``; say the default in it.
    """

    name: str
    type: type
    default: Any
    help: str

    def __post_init__(self) -> None:
        if (not isinstance(self.name, str) or not self.name.isidentifier() or keyword.iskeyword(self.name)
                or self.name != self.name.lower() or self.name.startswith("_")):
            raise ValueError(f"StrategyOption: name must be a lower-case Python identifier not starting with _ "
                             f"(e.g. 'my_weight'); got {self.name!r}")
        if self.type not in OPTION_TYPES:
            raise ValueError(f"StrategyOption {self.name!r}: type must be one of "
                             f"{', '.join(t.__name__ for t in OPTION_TYPES)}; got {self.type!r}")
        if not isinstance(self.help, str) or not self.help.strip():
            raise ValueError(f"StrategyOption {self.name!r}: help must be a non-empty string; got {self.help!r}")
        if self.name in ("strategy", "seed", "model"):
            raise ValueError(f"StrategyOption: {self.name!r} is a run argument of its own, not an option name")

    def entry(self) -> tuple[type, Any, str]:
        """``(type, default, help)``: the option's row of :data:`RUN_OPTIONS`."""
        return (self.type, self.default, self.help)


#: Every run option declared so far, by name, in declaration order (the order of the flags).
DECLARED_OPTIONS: dict[str, StrategyOption] = {}


def declare_option(option: StrategyOption) -> StrategyOption:
    """Adds ``option`` to :data:`DECLARED_OPTIONS` and returns it; an option of that name declared already is
    returned instead when its type is the same (a ValueError naming both types otherwise): strategies share
    an option by declaring it alike."""
    if not isinstance(option, StrategyOption):
        raise TypeError(f"declare_option: option must be a StrategyOption; got {type(option).__name__}")
    known = DECLARED_OPTIONS.get(option.name)
    if known is None:
        DECLARED_OPTIONS[option.name] = option
        return option
    if known.type is not option.type:
        raise ValueError(f"option {option.name!r} is declared already with type {known.type.__name__} "
                         f"({known.help!r}); a strategy sharing it must declare it as {known.type.__name__}, "
                         f"not {option.type.__name__}")
    return known


class _DeclaredOptionsTable(Mapping):
    """The read-only name -> ``(type, default, help)`` view of :data:`DECLARED_OPTIONS`."""

    def __getitem__(self, name: str) -> tuple[type, Any, str]:
        return DECLARED_OPTIONS[name].entry()

    def __iter__(self) -> Iterator[str]:
        return iter(list(DECLARED_OPTIONS))

    def __len__(self) -> int:
        return len(DECLARED_OPTIONS)

    def __repr__(self) -> str:
        return f"RUN_OPTIONS({dict(self)!r})"


#: Run options: name -> (type, default, help), derived from every option declared so far (a live view: the
#: options a strategy declares when it registers appear here). Defaults are the paper's MNIST settings
#: (Appendix B); CIFAR-10 runs take DATASET_RUN_DEFAULTS over them.
RUN_OPTIONS: Mapping[str, tuple[type, Any, str]] = _DeclaredOptionsTable()

#: The options the built-in families share (and the ExML strategies' own): name -> (type, default, help).
_SHARED_OPTIONS: dict[str, tuple[type, Any, str]] = {
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
    "synth_iterations": (int, 3000, "optimisation steps per synthesis batch, MI/DI (default: 3000; "
                                    "deepinversion-cil and synthetic-exemplars: DeepInversion's own)"),
    "synth_batch_size": (int, 256, "inputs optimised together, MI/DI (default: 256)"),
    "synth_lr": (float, 0.01, "Adam learning rate of the synthetic inputs (default: 0.01)"),
    "temperature": (float, None, "synthesizer temperature (default: MI 2, DI 20)"),
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
                                       "1 - JS(expert, learner) from the second expert on; deepinversion-cil: "
                                       "1 - JS(previous model, learner) in the synthesis rounds after the first "
                                       "(needs synth_rounds > 1) (default: 0, off)"),
    "aux_dataset": (str, None, "aux-ed: the unrelated dataset (default: the other of mnist / fashion-mnist)"),
    "weight_decay": (float, 0.0, "SGD weight decay of the learner (default: 0 for the ExML strategies; 5e-4 for "
                                 "the class-incremental ones, the experts' recipe)"),
    "gen_preset": (str, "skd", "gen-ed: the delegator's loss, a GenerativeSynthesizer preset: skd, dafl or dfad "
                               "(default: skd)"),
    "gen_arch": (str, "skd-narrow", "gen-ed, skd: the delegator network: skd-narrow, skd-small or skd-large "
                                    "(default: skd-narrow; skd: skd-small, SKD's Table IV)"),
    # -- the class-incremental strategies (they learn from the scenario's data) --
    "epochs": (int, None, "class-incremental: training epochs per task (default: the experts' epochs for the "
                          "scenario, 20 on Split MNIST)"),
    "lr_milestones": (tuple, None, "class-incremental: epochs after which the learner's lr is divided by 10, "
                                   "comma-separated (default: none, a constant lr; SKD's paper schedule: 80,120 of "
                                   "160 epochs at lr 0.1)"),
    "arch": (str, None, "class-incremental: learner architecture (default: lenet5_bn on MNIST and Fashion-MNIST, "
                        "resnet32 on CIFAR-10 and CIFAR-100)"),
}
for _name, (_type, _default, _help) in _SHARED_OPTIONS.items():
    declare_option(StrategyOption(_name, _type, _default, _help))

#: Options only gen-ed reads (the other ExML strategies refuse them).
GENERATIVE_ONLY_OPTIONS = frozenset({"gen_preset", "gen_arch"})

#: Options only the class-incremental strategies read (an ExML run given one is an error).
DATA_ONLY_OPTIONS = frozenset({"epochs", "lr_milestones", "arch", "distill_temperature", "distill_weight",
                               "distill_by_task", "lwf_form", "memory_size", "classifier", "synth_per_class",
                               "ce_classes", "head_epochs", "synth_rounds"})


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
    """The default of every run option declared, for a scenario of ``dataset``: RUN_OPTIONS' with
    DATASET_RUN_DEFAULTS'."""
    return {**{k: v[1] for k, v in RUN_OPTIONS.items()}, **DATASET_RUN_DEFAULTS.get(dataset, {})}


def parse_floats(value) -> tuple[float, ...]:
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
