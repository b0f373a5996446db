"""Strategies by their command-line name: :func:`register_strategy` adds one, :func:`build_strategy` builds one
from run options (:data:`~exml_fast.cl.strategies.options.RUN_OPTIONS`), :func:`run_named_strategy` runs it over
an expert stream. A new strategy plugs in here, from its own module or its own package, and no command-line code
changes::

    @register_strategy("my-cil", keeps_data=False, data=True, help="...",
                       options=["epochs", "lr", StrategyOption("my_weight", float, 0.5, "my term's weight")])
    def build(ctx: BuildContext, opt: dict) -> Strategy:
        return MyStrategy(build_data_learner(ctx, opt), weight=opt["my_weight"], ...)

``exml-fast run`` finds it by name once its module is imported: through the ``exml_fast.strategies``
entry-point group of an installed distribution (:func:`load_entry_points`), or as ``--strategy
package.module:name`` (:func:`resolve_strategy`). ``build_strategy(..., model=net)`` trains one's own network.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import pathlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from exml_fast.cl.engine import CHECKPOINT, run_stream
from exml_fast.cl.strategies.base import Strategy, derive_seed
from exml_fast.cl.strategies.options import (DATA_ONLY_OPTIONS, DECLARED_OPTIONS, GENERATIVE_ONLY_OPTIONS, RUN_OPTIONS,
                                             StrategyOption, declare_option, parse_floats, run_defaults)
from exml_fast.models import build_model

__all__ = ["DATA_ARCH_DEFAULTS", "ENTRY_POINT_GROUP", "STRATEGIES", "BuildContext", "StrategyOptionError",
           "StrategySpec", "build_data_learner", "build_learner", "build_strategy", "check_learner", "load_config",
           "load_entry_points", "options_read_by", "register_strategy", "resolve_strategy", "run_named_strategy",
           "stream_arch", "strategy_names"]

#: The entry-point group an installed distribution declares its strategies under (``name = "module:builder"``,
#: the name the builder registers).
ENTRY_POINT_GROUP = "exml_fast.strategies"


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
    #: the caller's own learner (``build_strategy(..., model=)``), checked against the scenario; None: the
    #: builder makes one (:func:`build_learner`, :func:`build_data_learner` return it when given)
    model: nn.Module | None = None


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
    """Decorator: registers ``builder(ctx, opt) -> Strategy`` under ``name``; a second registration of a name
    raises ValueError.

    Args:
        name: the command-line name (``exml-fast run --strategy <name>``, results, tables).
        keeps_data: whether the strategy keeps real data of past experiences (shown beside its results).
        help: one line for ``exml-fast run --help``.
        data: the strategy learns from the experiences' training data (class-incremental learning; its runs
            take a scenario, not an expert stream).
        defaults: defaults of this strategy's that differ from the options' own; the options a run gives
            still win.
        options: the run options the builder reads (a run that gives another is an error), each either a
            :class:`~exml_fast.cl.strategies.options.StrategyOption` — an option the strategy declares: it
            becomes a run option, an ``exml-fast run`` flag and a ``--config`` key — or the name of an option
            declared already (:data:`~exml_fast.cl.strategies.options.RUN_OPTIONS`: ``"lr"``, ``"epochs"``,
            ...). A StrategyOption of a name declared already shares that option: its type must match, and its
            default is this strategy's. None: every option declared so far but the class-incremental ones
            (DATA_ONLY_OPTIONS) and gen-ed's (GENERATIVE_ONLY_OPTIONS).
    """
    owner = f"register_strategy({name!r})"
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name:
        raise ValueError(f"register_strategy: name must be a non-empty string without surrounding spaces or ':'; "
                         f"got {name!r}")
    declared, named = _split_options(options, owner)
    unknown = (set(defaults or {}) | set(named)) - set(DECLARED_OPTIONS) - {o.name for o in declared}
    if unknown:
        raise ValueError(f"{owner}: defaults and options must name run options (declare a new one as "
                         f"StrategyOption(name, type, default, help)); unknown: {sorted(unknown)}")
    for option in declared:  # checked before anything is declared: a refused registration changes nothing
        known = DECLARED_OPTIONS.get(option.name)
        if known is not None and known.type is not option.type:
            raise ValueError(f"{owner}: option {option.name!r} is declared already with type "
                             f"{known.type.__name__}; declare it as {known.type.__name__}, not "
                             f"{option.type.__name__}, or pick another name")

    def add(builder):
        if name in STRATEGIES:
            raise ValueError(f"register_strategy: {name!r} is registered already")
        if not callable(builder):
            raise TypeError(f"{owner}: decorates a builder(ctx, opt) -> Strategy; got {type(builder).__name__}")
        own_defaults = {}
        for option in declared:
            known = declare_option(option)
            if known is not option and known.default != option.default:
                own_defaults[option.name] = option.default
        reads = (frozenset(named) | {o.name for o in declared} if options is not None
                 else frozenset(DECLARED_OPTIONS) - DATA_ONLY_OPTIONS - GENERATIVE_ONLY_OPTIONS)
        STRATEGIES[name] = StrategySpec(name, builder, bool(keeps_data), help, bool(data),
                                        {**own_defaults, **(defaults or {})}, reads)
        return builder

    return add


def _split_options(options, owner: str) -> tuple[list[StrategyOption], list[str]]:
    """``options`` of :func:`register_strategy` as (the StrategyOption objects, the names)."""
    if options is None:
        return [], []
    if isinstance(options, (str, StrategyOption)) or not hasattr(options, "__iter__"):
        raise TypeError(f"{owner}: options must be a list of StrategyOption objects and option names; got "
                        f"{type(options).__name__}")
    declared, named = [], []
    for item in options:
        if isinstance(item, StrategyOption):
            declared.append(item)
        elif isinstance(item, str):
            named.append(item)
        else:
            raise TypeError(f"{owner}: options must hold StrategyOption objects and option names; got "
                            f"{type(item).__name__} {item!r}")
    return declared, named


def strategy_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(STRATEGIES)


def load_entry_points() -> tuple[str, ...]:
    """Imports the strategies that installed distributions declare under the ``exml_fast.strategies``
    entry-point group and that are not registered yet; returns the names registered. A plugin that fails to
    load is skipped with a warning (:func:`resolve_strategy` of its name raises the error instead)."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in STRATEGIES:
            continue
        try:
            _load_entry_point(ep)
        except Exception as e:  # a broken plugin must not break the other strategies' runs
            warnings.warn(f"exml_fast: strategy plugin {ep.name!r} ({ep.value}) not loaded: {e}", stacklevel=2)
        else:
            loaded.append(ep.name)
    return tuple(loaded)


def _load_entry_point(ep) -> None:
    """Loads entry point ``ep`` of the group: importing its module registers the strategy of its name."""
    obj = ep.load()
    if ep.name not in STRATEGIES:
        other = _registered_name(obj)
        raise ValueError(f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP}) registers no strategy "
                         f"named {ep.name!r}" + (f"; its object is registered as {other!r}: name the entry point so"
                                                 if other else "; point it at a builder decorated with "
                                                               "@register_strategy(" + repr(ep.name) + ", ...)"))


def _registered_name(obj) -> str | None:
    """The registered name of ``obj``: a builder decorated with :func:`register_strategy`, or a Strategy class
    whose ``name`` is registered."""
    for spec in STRATEGIES.values():
        if spec.build is obj:
            return spec.name
    if isinstance(obj, type) and issubclass(obj, Strategy) and obj.name in STRATEGIES:
        return obj.name
    return None


def resolve_strategy(name: str) -> str:
    """The registered name of the strategy ``name`` refers to, importing it when needed: a registered name; the
    name of an entry point of the ``exml_fast.strategies`` group (:func:`load_entry_points`); or
    ``package.module:attr``, whose module is imported and whose ``attr`` is a registered name, a builder
    decorated with :func:`register_strategy`, or a Strategy class whose ``name`` is registered. A ValueError
    that says which, otherwise."""
    if isinstance(name, str) and name in STRATEGIES:
        return name
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--strategy must be a strategy name or package.module:name; got {name!r}")
    if ":" in name:
        return _resolve_reference(name)
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name in eps:
        try:
            _load_entry_point(eps[name])
        except Exception as e:
            raise ValueError(f"--strategy {name}: the plugin's entry point {eps[name].value!r} (group "
                             f"{ENTRY_POINT_GROUP}) failed to load: {type(e).__name__}: {e}") from e
        return name
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, the name of an installed plugin's "
                     f"strategy (entry-point group {ENTRY_POINT_GROUP}) or package.module:name; got {name!r}")


def _resolve_reference(ref: str) -> str:
    """The registered name ``package.module:attr`` refers to (see :func:`resolve_strategy`)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"--strategy {ref}: expected package.module:name (one ':')")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"--strategy {ref}: cannot import module {module_name!r} ({e}); is its package installed "
                         f"or on PYTHONPATH?") from None
    except Exception as e:
        raise ValueError(f"--strategy {ref}: importing module {module_name!r} failed: {type(e).__name__}: "
                         f"{e}") from e
    if attr in STRATEGIES:
        return attr
    found = _registered_name(getattr(module, attr, None))
    if found is not None:
        return found
    own = [n for n, spec in STRATEGIES.items() if getattr(spec.build, "__module__", None) == module.__name__]
    raise ValueError(f"--strategy {ref}: module {module_name!r} has no strategy {attr!r} (a registered name, a "
                     "builder decorated with @register_strategy, or a Strategy class of a registered name); "
                     + (f"it registers {', '.join(own)}" if own else "it registers none"))


def stream_arch(stream) -> str:
    """The architecture of a stream's experts (the stream's metadata, else its first expert's entry)."""
    return stream.meta.get("arch", stream.entries[0].get("arch"))


def build_learner(stream, seed: int, *, model: nn.Module | None = None) -> torch.nn.Module:
    """A fresh model of the experts' architecture, initialised from ``seed`` (the global RNG left untouched);
    ``model`` itself when given (the caller's own network, ``BuildContext.model``)."""
    if model is not None:
        return model
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
    global RNG left untouched); the caller's own network ``ctx.model`` when given."""
    if ctx.model is not None:
        return ctx.model
    scenario = ctx.scenario
    arch = opt.get("arch") or DATA_ARCH_DEFAULTS.get(scenario.dataset, "lenet5_bn")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.seed, "learner-init"))
        return build_model(arch, num_classes=scenario.num_classes, in_channels=scenario.input_shape[0])


def check_learner(model, scenario, owner: str = "build_strategy") -> nn.Module:
    """``model`` if it can be a learner of ``scenario``'s runs: an ``nn.Module`` mapping (B, C, H, W) inputs
    (the scenario's ``input_shape``) to (B, num_classes) logits, one per class of the scenario — checked with
    one forward pass of two zero images in eval mode, without gradients, the module's mode restored. A
    TypeError or ValueError naming ``model`` and what was expected, otherwise. A scenario without
    ``input_shape`` or ``num_classes`` skips the forward check."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module (the learner: (B, C, H, W) images -> "
                        f"(B, num_classes) logits); got {type(model).__name__}")
    shape, classes = getattr(scenario, "input_shape", None), getattr(scenario, "num_classes", None)
    if shape is None or classes is None:
        return model
    p = next(iter(model.parameters()), None)
    x = torch.zeros(2, *shape, device=p.device if p is not None else "cpu")
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        raise ValueError(f"{owner}: model fails on the scenario's inputs, a (2, {', '.join(map(str, shape))}) "
                         f"batch: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{owner}: model must output (B, {classes}) logits, one per class of the scenario "
                         f"({classes} classes), for (B, {', '.join(map(str, shape))}) inputs; it gives {got} for "
                         "B = 2")
    return model


def options_read_by(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that strategy ``name`` reads (its builder refuses the others): a shared
    budget's options narrowed to one strategy."""
    reads = STRATEGIES[name].options
    return {k: v for k, v in options.items() if k in reads}


def build_strategy(name: str, stream, scenario, *, options: dict[str, Any], seed: int, device: torch.device,
                   progress: bool, data_root=None, model: nn.Module | None = None) -> Strategy:
    """The strategy registered as ``name`` with ``options`` (RUN_OPTIONS names) over the strategy's own
    defaults, over the defaults of the scenario's dataset (:func:`~exml_fast.cl.strategies.options.run_defaults`:
    the MNIST settings, CIFAR-10's Appendix B.2). ``stream`` is None for the strategies that learn from data.

    ``name`` may also be a plugin's (:func:`resolve_strategy`: an entry point's name, ``package.module:name``).
    ``model``: one's own learner instead of the one the strategy would build (checked by
    :func:`check_learner`: an ``nn.Module`` with one output per class of the scenario); the strategy trains it
    in place. A strategy that trains no learner of its own (the ensembles, param-avg) refuses it."""
    name = resolve_strategy(name)
    spec = STRATEGIES[name]
    if spec.data != (stream is None):
        raise StrategyOptionError(f"strategy {name!r} learns from " + ("the scenario's data: pass no expert stream"
                                                              if spec.data else "experts: pass an expert stream"))
    given = {k: v for k, v in options.items() if v is not None}
    unused = sorted(set(given) - spec.options)
    if unused:
        raise StrategyOptionError(f"strategy {name!r} does not use the option(s) {', '.join(unused)}; it reads "
                         f"{', '.join(sorted(spec.options))}")
    if model is not None:
        check_learner(model, scenario, f"build_strategy({name!r})")
        if given.get("arch") is not None:
            raise StrategyOptionError(f"build_strategy({name!r}): pass model= or the arch option, not both (each "
                                      "picks the learner)")
    opt = run_defaults(scenario.dataset)
    opt.update(spec.defaults or {})
    opt.update(given)
    ctx = BuildContext(stream=stream, scenario=scenario, seed=seed, device=device, progress=progress,
                       data_root=data_root, model=model)
    strategy = spec.build(ctx, opt)
    if model is not None and getattr(strategy, "model", None) is not model:
        raise ValueError(f"build_strategy({name!r}): the strategy does not train the network passed as model= "
                         f"({type(strategy).__name__} builds its own or trains none); pass model=None")
    return strategy


def run_named_strategy(name: str, stream, scenario, *, options: dict[str, Any], seed: int, device: torch.device,
                       out, resume: bool | None = None, stop_after: int | None = None, plots: bool = True,
                       progress: bool = False, data_root=None, log=None, model: nn.Module | None = None):
    """Builds strategy ``name`` (:func:`build_strategy`) and runs it over ``stream`` (:func:`run_stream`).

    ``resume`` None: continue the run in ``out`` when it holds a checkpoint, else start it. ``model``: one's own
    learner (:func:`build_strategy`).
    """
    if resume is None:
        resume = (pathlib.Path(out) / CHECKPOINT).exists()
    with warnings.catch_warnings():
        # LeNet-5 experts have no BatchNorm: the synthesizers say so once per expert; a run needs no reminder.
        warnings.filterwarnings("ignore", message=".*has no BatchNorm layer.*")
        strategy = build_strategy(name, stream, scenario, options=options, seed=seed, device=device,
                                  progress=progress, data_root=data_root, model=model)
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
    out = {}
    if "strategy" in data:  # first: a plugin's module declares its options when imported
        try:
            out["strategy"] = resolve_strategy(data["strategy"])
        except ValueError as e:
            raise ValueError(f"--config {path}: strategy: {e}") from None
    allowed = set(RUN_OPTIONS) | {"strategy", "seed"}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise ValueError(f"--config {path}: unknown option {key!r}; allowed: {', '.join(sorted(allowed))}")
        if name == "strategy":
            continue
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
