"""Generative Ex-Model Distillation (``--strategy gen-ed``; in no paper): Ex-Model Distillation whose samples
come from one knowledge delegator (SKD's trained generator) fine-tuned on each arriving expert, drawn fresh at
every distillation step instead of from a fixed buffer."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast.cl.strategies.base import check_int, derive_seed, expert_name
from exml_fast.cl.strategies.ed import ExModelDistillation
from exml_fast.cl.strategies.registry import BuildContext, build_learner, register_strategy
from exml_fast.models.generators import GENERATOR_ARCHS
from exml_fast.synth.base import eval_mode
from exml_fast.synth.generative import GENERATIVE_PRESETS, GenerativeSynthesizer

__all__ = ["GEN_ED_OPTIONS", "GenerativeED"]

#: The run options gen-ed reads: ED's distillation ones, synth_iterations / synth_batch_size for the delegator's
#: fit per expert, and its own gen_preset / gen_arch.
GEN_ED_OPTIONS = frozenset({"iterations", "lr", "momentum", "weight_decay", "batch_size", "lambda_ce", "target_mode",
                            "normalize", "augment", "flip", "synth_iterations", "synth_batch_size", "gen_preset",
                            "gen_arch"})


class _DelegatorSource:
    """What :class:`ExModelDistillation` records as the source of :class:`GenerativeED`."""

    ex_model = True

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def describe(self) -> dict[str, Any]:
        return {"method": "generative", "options": dict(self.options)}

    def generate(self, expert, n, *, seed, device, progress):  # pragma: no cover - GenerativeED draws itself
        raise NotImplementedError("GenerativeED draws from its delegator at every step; it has no buffer to fill")


class GenerativeED(ExModelDistillation):
    """Ex-Model Distillation from one knowledge delegator fine-tuned on each expert.

    For the i-th expert:

    1. the delegator ``D`` (SKD's generator; built at the first expert, then the previous expert's ``D``
       trained further, SKD's ``D_n`` from ``D_{n-1}``) is fitted on the expert for ``fit_iterations``
       steps with :class:`~exml_fast.synth.GenerativeSynthesizer` (``preset``, ``generator_arch``);
    2. for ``iterations`` SGD steps, each minibatch is ``batch_size`` fresh samples ``D(z)`` (augmented as
       in ED), labelled by the expert's argmax over its classes, and the learner minimises ED's loss
       (:func:`exml_fast.ops.ed_loss`) against the expert on its classes and a frozen copy of the learner
       taken before the experience on the classes seen before.

    Memory between experiences: the learner and one generator (no sample buffer, no expert). Old classes
    are kept through the frozen learner's logits on the new samples, and through what the fine-tuned
    delegator still makes of them.

    Args:
        model: the learner (as :class:`ExModelDistillation`).
        preset: :data:`~exml_fast.synth.GENERATIVE_PRESETS` name of the delegator's loss (default ``"skd"``).
        generator_arch: a :data:`~exml_fast.models.GENERATOR_ARCHS` name (default ``"skd-narrow"``, sized
            for 28-32 px inputs on a CPU).
        fit_iterations, fit_batch_size: the delegator's explore steps per expert and their batch.
        synth_options: further :class:`~exml_fast.synth.GenerativeSynthesizer` keyword arguments
            (``weights``, ``lr_generator``, ...).
        iterations, lr, momentum, weight_decay, batch_size, lambda_ce, target_mode, normalize, augment,
        pad_crop, max_shift, flip, seed, device, progress: as :class:`ExModelDistillation`.

    Single-head streams only: experts with task labels are refused.
    """

    name = "gen-ed"

    def __init__(self, model: nn.Module, *, preset: str = "skd", generator_arch: str = "skd-narrow",
                 fit_iterations: int = 200, fit_batch_size: int = 128, synth_options: dict[str, Any] | None = None,
                 **ed_options: Any) -> None:
        owner = type(self).__name__
        for key in ("source", "source_options", "generator", "generator_options", "buffer_size", "temperature"):
            if key in ed_options:
                raise TypeError(f"{owner}: {key} is not an option of the generative ED (its samples come from "
                                "its delegator)")
        check_choice(preset, "preset", owner, GENERATIVE_PRESETS)
        if generator_arch not in GENERATOR_ARCHS:
            raise ValueError(f"{owner}: generator_arch must be one of {sorted(GENERATOR_ARCHS)}; "
                             f"got {generator_arch!r}")
        if synth_options is not None and not isinstance(synth_options, dict):
            raise TypeError(f"{owner}: synth_options must be a dict; got {type(synth_options).__name__}")
        self.preset, self.generator_arch = preset, generator_arch
        self.fit_iterations = check_int(fit_iterations, "fit_iterations", owner, low=1)
        self.fit_batch_size = check_int(fit_batch_size, "fit_batch_size", owner, low=2)
        self.synth_options = dict(synth_options or {})
        clash = sorted(set(self.synth_options) & {"preset", "generator_arch", "delegator", "device", "input_shape",
                                                  "mean", "std", "num_classes"})
        if clash:
            raise TypeError(f"{owner}: synth_options may not set {clash} (given by the strategy or the expert)")
        source = _DelegatorSource({"preset": preset, "generator_arch": generator_arch,
                                   "fit_iterations": self.fit_iterations, "fit_batch_size": self.fit_batch_size,
                                   **{k: v for k, v in sorted(self.synth_options.items())
                                      if isinstance(v, (int, float, str, bool, type(None), dict))}})
        super().__init__(model, source=source, buffer_size=1, **ed_options)
        self.name = "gen-ed"
        self.delegator: nn.Module | None = None
        self._input_shape: tuple[int, ...] | None = None
        self._latent_dim: int | None = None  # the delegator's, set with it

    def _synthesizer(self, teacher: nn.Module, shape: tuple[int, ...], **kw: Any) -> GenerativeSynthesizer:
        """A GenerativeSynthesizer on ``teacher`` around the current delegator (None: built at its fit)."""
        return GenerativeSynthesizer(teacher, input_shape=shape, device=self._device(), preset=self.preset,
                                     generator_arch=self.generator_arch, delegator=self.delegator,
                                     **kw, **self.synth_options)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("buffer_size", None)
        return cfg

    def train(self, expert) -> None:
        """One experience: fine-tune the delegator on ``expert``, then distil from its fresh samples."""
        self._check_expert(expert)
        owner = f"{type(self).__name__}.train"
        if expert.task_id is not None:
            raise ValueError(f"{owner}: expert {expert_name(expert)} has a task label; the generative ED learns "
                             "single-head (class-incremental) streams only")
        if expert.input_shape is None:
            raise ValueError(f"{owner}: expert {expert_name(expert)} has no input_shape in its metadata")
        i = self.experiences_seen + 1
        dev = self._device()
        expert_model = expert.model.to(dev).eval()
        shape = tuple(int(s) for s in expert.input_shape)
        if self._input_shape is not None and shape != self._input_shape:
            raise ValueError(f"{owner}: expert {expert_name(expert)} takes inputs {shape}; the delegator makes "
                             f"{self._input_shape}")
        self._input_shape = shape
        synth = self._synthesizer(expert_model, shape, mean=expert.mean, std=expert.std,
                                  num_classes=expert.num_classes)
        t0 = time.perf_counter()
        fit = synth.fit(self.fit_iterations, batch_size=self.fit_batch_size,
                        generator=derive_seed(self.seed, "delegator", i), progress=self.progress)
        t_fit = time.perf_counter() - t0
        self.delegator, self._latent_dim = synth.delegator, synth.latent_dim
        fit_stats = {k: v[-1] for k, v in fit.history.items() if v}
        del synth, fit

        loss, t_distill = self._distill_from(expert_model, expert, i)
        del expert_model
        self._record(expert, generated=self.iterations * self.batch_size, final_loss=loss,
                     generate_s=round(t_fit, 3), distill_s=round(t_distill, 3), source_stats=fit_stats)

    def _minibatch(self, gen: torch.Generator, expert_model: nn.Module, expert_classes: torch.Tensor, *,
                   rows: tuple[int, int] | None = None):
        """``batch_size`` fresh delegator samples (``rows=(lo, hi)``: those rows of them), labelled by the
        expert's argmax over its classes."""
        dev = self._device()
        z = torch.randn(self.batch_size, self._latent_dim, generator=gen)
        if rows is not None:
            z = z[rows[0] : rows[1]]
        with torch.no_grad(), eval_mode(self.delegator):
            x = self.delegator(z.to(dev))
            y = expert_classes[expert_model(x)[:, expert_classes].argmax(1)]
        return x, y, torch.full((z.shape[0],), self.experiences_seen, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("buffer", None)
        state["delegator"] = None if self.delegator is None else self.delegator.state_dict()
        state["delegator_input_shape"] = self._input_shape
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        delegator, shape = state.pop("delegator", None), state.pop("delegator_input_shape", None)
        state["buffer"] = self.buffer.state_dict()
        super().load_state_dict(state)
        self.delegator, self._input_shape, self._latent_dim = None, None, None
        if delegator is not None:
            self._input_shape = tuple(shape)
            synth = self._synthesizer(self.model, self._input_shape, num_classes=self.num_classes)
            synth.load_state_dict(delegator)
            self.delegator, self._latent_dim = synth.delegator, synth.latent_dim


@register_strategy("gen-ed", keeps_data=False, options=GEN_ED_OPTIONS,
                   help="Ex-Model Distillation from one knowledge delegator fine-tuned on each expert, fresh "
                        "samples every step (no buffer; in no paper)")
def _gen_ed(ctx: BuildContext, opt: dict[str, Any]) -> GenerativeED:
    return GenerativeED(
        build_learner(ctx.stream, ctx.seed, model=ctx.model), preset=opt["gen_preset"], generator_arch=opt["gen_arch"],
        fit_iterations=opt["synth_iterations"], fit_batch_size=opt["synth_batch_size"],
        iterations=opt["iterations"], lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"],
        batch_size=opt["batch_size"], lambda_ce=opt["lambda_ce"], target_mode=opt["target_mode"],
        normalize=opt["normalize"], augment=opt["augment"], flip=opt["flip"], seed=ctx.seed, device=ctx.device,
        progress=ctx.progress)
