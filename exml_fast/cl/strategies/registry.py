"""Strategies by their command-line name: :func:`register_strategy` adds one, :func:`build_strategy` builds one
from run options (:data:`~exml_fast.cl.strategies.options.RUN_OPTIONS`), :func:`run_named_strategy` runs it over
an expert stream. A new strategy plugs in here, from its own module, and no command-line code changes::

    @register_strategy("my-ed", keeps_data=False, help="...")
    def _build(ctx: BuildContext, opt: dict) -> Strategy:
        return MyStrategy(build_learner(ctx.stream, ctx.seed), seed=ctx.seed, device=ctx.device)
"""

from __future__ import annotations

import json
import pathlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from exml_fast.cl.engine import CHECKPOINT, run_stream
from exml_fast.cl.strategies.base import Strategy, derive_seed
from exml_fast.cl.strategies.options import (DATA_ONLY_OPTIONS, GENERATIVE_ONLY_OPTIONS, RUN_OPTIONS, parse_floats,
                                             run_defaults)
from exml_fast.models import build_model

__all__ = ["DATA_ARCH_DEFAULTS", "STRATEGIES", "BuildContext", "StrategyOptionError", "StrategySpec",
           "build_data_learner", "build_learner", "build_strategy", "load_config", "options_read_by",
           "register_strategy", "run_named_strategy", "stream_arch", "strategy_names"]


class StrategyOptionError(ValueError):
    """A run option the strategy does not read, or a run of the wrong kind for it (experts for a strategy that
    learns from data, or the other way round)."""


@dataclass(frozen=True)
class BuildContext:
    """What a strategy builder may need besides the run options: the expert stream (None for the strategies
    that learn from data) and the scenario, the run's seed and device, progress bars, and where datasets live
    (auxiliary data)."""

    stream: Any
    scenario: Any
    seed: int
    device: torch.device
    progress: bool
    data_root: Any = None


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its command-line name, its builder, whether it keeps real data of past
    experiences (shown beside its results), a one-line description, whether it learns from the experiences'
    data (class-incremental) instead of from experts, its own defaults over the run options', and the run
    options its builder reads."""

    name: str
    build: Callable[[BuildContext, dict[str, Any]], Strategy]
    keeps_data: bool
    help: str
    data: bool = False
    defaults: dict[str, Any] | None = None
    options: frozenset[str] | None = None


#: Registered strategies by command-line name, in registration order (the order of ``--strategy``'s choices).
STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(name: str, *, keeps_data: bool, help: str, data: bool = False,
                      defaults: dict[str, Any] | None = None, options=None):
    """Decorator: registers ``builder(ctx, options) -> Strategy`` under ``name``; a second registration of a name
    raises ValueError. ``data``: the strategy learns from the experiences' training data (class-incremental
    learning; its runs take a scenario, not an expert stream). ``defaults``: run options (RUN_OPTIONS names)
    whose defaults differ for this strategy; the options a run gives still win. ``options``: the run options
    the builder reads (a run that gives another is an error); None: every option but the class-incremental
    ones (DATA_ONLY_OPTIONS) and gen-ed's (GENERATIVE_ONLY_OPTIONS)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"register_strategy: name must be a non-empty string without surrounding spaces; got "
                         f"{name!r}")

    unknown = (set(defaults or {}) | set(options or ())) - set(RUN_OPTIONS)
    if unknown:
        raise ValueError(f"register_strategy: defaults and options must name run options; unknown: "
                         f"{sorted(unknown)}")
    reads = (frozenset(options) if options is not None
             else frozenset(RUN_OPTIONS) - DATA_ONLY_OPTIONS - GENERATIVE_ONLY_OPTIONS)

    def add(builder):
        if name in STRATEGIES:
            raise ValueError(f"register_strategy: {name!r} is registered already")
        STRATEGIES[name] = StrategySpec(name, builder, bool(keeps_data), help, bool(data), dict(defaults or {}),
                                        reads)
        return builder

    return add


def strategy_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(STRATEGIES)


def stream_arch(stream) -> str:
    """The architecture of a stream's experts (the stream's metadata, else its first expert's entry)."""
    return stream.meta.get("arch", stream.entries[0].get("arch"))


def build_learner(stream, seed: int) -> torch.nn.Module:
    """A fresh model of the experts' architecture, initialised from ``seed`` (the global RNG left untouched)."""
    arch = stream_arch(stream)
    arch_kwargs = stream.meta.get("arch_kwargs") or stream[0].arch_kwargs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "learner-init"))
        return build_model(arch, **arch_kwargs)


#: The learner architecture of class-incremental runs by dataset, when the run gives no ``arch``.
#: Networks with BatchNorm, whose statistics the DeepInversion-based strategies match: LeNet-5-BN on the digits
#: and clothes; on CIFAR He et al.'s ResNet-32, the iCaRL and PyCIL network.
DATA_ARCH_DEFAULTS = {"mnist": "lenet5_bn", "fashion-mnist": "lenet5_bn", "cifar10": "resnet32",
                      "cifar100": "resnet32"}


def build_data_learner(ctx: BuildContext, opt: dict[str, Any]) -> torch.nn.Module:
    """A fresh learner for a class-incremental run: ``opt["arch"]`` (default: DATA_ARCH_DEFAULTS of the
    scenario's dataset) with the scenario's classes and input channels, initialised from the run's seed (the
    global RNG left untouched)."""
    scenario = ctx.scenario
    arch = opt.get("arch") or DATA_ARCH_DEFAULTS.get(scenario.dataset, "lenet5_bn")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.seed, "learner-init"))
        return build_model(arch, num_classes=scenario.num_classes, in_channels=scenario.input_shape[0])


def options_read_by(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that strategy ``name`` reads (its builder refuses the others): a shared
    budget's options narrowed to one strategy."""
    reads = STRATEGIES[name].options
    return {k: v for k, v in options.items() if k in reads}


def build_strategy(name: str, stream, scenario, *, options: dict[str, Any], seed: int, device: torch.device,
                   progress: bool, data_root=None) -> Strategy:
    """The strategy registered as ``name`` with ``options`` (RUN_OPTIONS names) over the strategy's own
    defaults, over the defaults of the scenario's dataset (:func:`~exml_fast.cl.strategies.options.run_defaults`:
    the MNIST settings, CIFAR-10's Appendix B.2). ``stream`` is None for the strategies that learn from data."""
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    spec = STRATEGIES[name]
    if spec.data != (stream is None):
        raise StrategyOptionError(f"strategy {name!r} learns from " + ("the scenario's data: pass no expert stream"
                                                              if spec.data else "experts: pass an expert stream"))
    given = {k: v for k, v in options.items() if v is not None}
    unused = sorted(set(given) - spec.options)
    if unused:
        raise StrategyOptionError(f"strategy {name!r} does not use the option(s) {', '.join(unused)}; it reads "
                         f"{', '.join(sorted(spec.options))}")
    opt = run_defaults(scenario.dataset)
    opt.update(spec.defaults or {})
    opt.update(given)
    ctx = BuildContext(stream=stream, scenario=scenario, seed=seed, device=device, progress=progress,
                       data_root=data_root)
    return spec.build(ctx, opt)


def run_named_strategy(name: str, stream, scenario, *, options: dict[str, Any], seed: int, device: torch.device,
                       out, resume: bool | None = None, stop_after: int | None = None, plots: bool = True,
                       progress: bool = False, data_root=None, log=None):
    """Builds strategy ``name`` (:func:`build_strategy`) and runs it over ``stream`` (:func:`run_stream`).

    ``resume`` None: continue the run in ``out`` when it holds a checkpoint, else start it.
    """
    if resume is None:
        resume = (pathlib.Path(out) / CHECKPOINT).exists()
    with warnings.catch_warnings():
        # LeNet-5 experts have no BatchNorm: the synthesizers say so once per expert; a run needs no reminder.
        warnings.filterwarnings("ignore", message=".*has no BatchNorm layer.*")
        strategy = build_strategy(name, stream, scenario, options=options, seed=seed, device=device,
                                  progress=progress, data_root=data_root)
        return run_stream(strategy, stream, scenario, out=out, resume=resume, stop_after=stop_after, plots=plots,
                          progress=progress, log=log)


def load_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a YAML (or JSON) run config: a mapping of RUN_OPTIONS names (and ``strategy``, ``seed``)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
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
        if name == "strategy" and value not in STRATEGIES:
            raise ValueError(f"--config {path}: strategy must be one of {', '.join(STRATEGIES)}; got {value!r}")
        if name in RUN_OPTIONS and value is not None and RUN_OPTIONS[name][0] is tuple:
            try:
                value = parse_floats(value)
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
