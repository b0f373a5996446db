"""Optimisation-based synthesizers: ModelInversion, DeepInversion (+ADI), DataImpressions.

All three optimise a batch of random inputs against a frozen teacher with one
engine; they differ in the objective and the defaults:

    total = main(teacher(A(x)), y) + bn_weight · R_BN + Σ prior weights · priors(x)
            + competition_weight · (1 − JS(teacher(A(x)), competitor(A(x))))

``A`` is a per-sample random augmentation (roll-jitter, flip, pad-crop; drawn
anew every step), ``R_BN`` the BatchNorm-statistic loss of every BN layer's
input (:class:`exml_fast.BNStatsMatcher`, fused kernel), the priors come from
one fused :func:`exml_fast.ops.image_priors` pass over the un-augmented ``x``.

One optimisation step is a single function of static tensors (the input, its
Adam moments, the kept best batch, per-step scalars), so it can run eagerly,
under ``torch.compile``, or be captured whole in a CUDA graph, and needs no
host synchronisation: the best batch is selected on the device, the learning
rate comes from a precomputed table, and the random draws are made ahead in
chunks. The host reads the loss terms only when the progress bar refreshes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from exml_fast._utils.checks import check_choice, check_float
from exml_fast._utils.dtypes import PRECISIONS, autocast_to
from exml_fast.ops.augment import augment_with_params
from exml_fast.ops.class_similarity import class_similarity
from exml_fast.ops.dirichlet import dirichlet_targets
from exml_fast.ops.image_priors import image_priors
from exml_fast.ops.soft_target_losses import js_divergence, soft_target_cross_entropy
from exml_fast.ops.fast_layers import fast_layers
from exml_fast.reference.augment import draw_augment_params
from exml_fast.reference.bn_stats import BN_LOSS_FORMS
from exml_fast.reference.soft_target_losses import JS_FORMS
from exml_fast.synth.agreement import LowAgreementWarning, agreement_message, stacklevel_outside_synth
from exml_fast.synth.base import Synthesizer, eval_mode, frozen
from exml_fast.synth.batch import SyntheticBatch
from exml_fast.synth.input_grad_conv import input_grad_convs
from exml_fast.synth.inversion_settings import ENGINE_DEFAULTS, InversionSettings, check_names, merge_settings
from exml_fast.synth.matcher import BNStatsMatcher
from exml_fast.synth.presets import DEEPINVERSION_PRESETS, PRESET_NAMES, measured_bn_weight, resolve_deepinversion

__all__ = ["DATA_IMPRESSIONS_BETA", "DEEPINVERSION_PRESETS", "DataImpressions", "DeepInversion", "InversionSettings",
           "LowAgreementWarning", "ModelInversion"]

#: The Data Impressions paper's β mixture (§4.1.2: half of each class's targets drawn at β 1.0, half at 0.1,
#: on every dataset), :class:`DataImpressions`' default.
DATA_IMPRESSIONS_BETA: tuple[float, float] = (1.0, 0.1)

AUGMENT_PER = ("sample", "batch")
SCHEDULES = ("cosine", "constant")
PRIORS = ("tv_l1", "tv_l2", "blur", "l2", "l2_sq")
# Draws of augmentation parameters made ahead, in steps; a chunk is one
# (chunk, B, 5) int64 table copied to the device at once.
_AUG_CHUNK = 64
# fp16 dynamic loss scaling (on the device, no host sync): start, growth period.
_FP16_INIT_SCALE = 2.0**8
_FP16_GROWTH_INTERVAL = 200






def lr_table(lr: float, iterations: int, *, schedule: str, warmup: float) -> torch.Tensor:
    """Learning rate of each step, (iterations,) float64.

    "cosine": a linear warm-up over the first ``warmup`` fraction of the steps
    (rising to ``lr`` at the end of it), then a cosine decay from ``lr`` to 0
    over the rest — DeepInversion's ``lr_cosine_policy``. "constant": ``lr``
    after the same warm-up.
    """
    steps = torch.arange(iterations, dtype=torch.float64)
    w = int(round(warmup * iterations))
    out = torch.full((iterations,), float(lr), dtype=torch.float64)
    if schedule == "cosine":
        rest = max(1, iterations - w)
        out = 0.5 * (1 + torch.cos(math.pi * (steps - w).clamp_min(0) / rest)) * lr
    if w > 0:
        out = torch.where(steps < w, lr * (steps + 1) / w, out)
    return out


def auto_channels_last(teacher: nn.Module, device: torch.device, precision: str) -> bool:
    """The memory format ``channels_last=None`` picks: channels_last on the CPU for a teacher with a
    convolution of 16 or more input channels (oneDNN's convolutions, forward and input gradient, ran
    1.1–1.5x faster in it than in NCHW on ResNet layers, on AVX-512 and on AVX2; benches/results/
    synthesis_cpu.md), NCHW otherwise: for LeNet-sized layers NCHW was as fast or faster, and a few
    channels per pixel make channels_last's per-row loops short. CUDA keeps NCHW (not measured here)."""
    if device.type != "cpu" or precision == "fp16":
        return False
    return any(isinstance(m, nn.Conv2d) and m.in_channels >= 16 for m in teacher.modules())


class _Inversion(Synthesizer):
    """The shared optimisation engine; use ModelInversion, DeepInversion or DataImpressions."""

    objective = "ce"  # or "soft": soft-target cross-entropy on per-sample targets

    def __init__(self, teacher: nn.Module, *, input_shape: Sequence[int], mean=None, std=None,
                 num_classes: int | None = None, device: torch.device | str | None = None, **options: Any) -> None:
        """``options``: the fields of :class:`~exml_fast.synth.InversionSettings` (``iterations``, ``batch_size``
        and ``lr`` required; the others default to :data:`~exml_fast.synth.inversion_settings.ENGINE_DEFAULTS`)."""
        owner = type(self).__name__
        check_names(options, owner)
        missing = [k for k in ("iterations", "batch_size", "lr") if k not in options]
        if missing:
            raise TypeError(f"{owner}.__init__() missing required keyword argument(s): {', '.join(missing)}")
        o = SimpleNamespace(**{**ENGINE_DEFAULTS, **options})
        super().__init__(
            teacher, input_shape=input_shape, mean=mean, std=std, num_classes=num_classes,
            device=device, iterations=o.iterations, batch_size=o.batch_size,
        )
        self._set_optimiser(o, owner)
        self._set_bn(o, owner, teacher)
        self._set_priors(o, owner)
        self._set_inputs(o, owner)
        self._set_competition(o, owner)
        self._set_execution(o, owner, teacher)
        self._set_stopping(o, owner)
        self._warned_agreement = False
        self._compiled = None

    def _set_optimiser(self, o: SimpleNamespace, owner: str) -> None:
        """Adam, its learning-rate schedule and the main term's temperature."""
        self.lr = check_float(o.lr, "lr", owner, positive=True)
        if len(tuple(o.betas)) != 2 or not all(0.0 <= float(b) < 1.0 for b in o.betas):
            raise ValueError(f"{owner}: betas must be two numbers in [0, 1); got {o.betas!r}")
        self.betas = (float(o.betas[0]), float(o.betas[1]))
        self.adam_eps = check_float(o.adam_eps, "adam_eps", owner, positive=True)
        self.schedule = check_choice(o.schedule, "schedule", owner, SCHEDULES)
        if isinstance(o.warmup, bool) or not isinstance(o.warmup, (int, float)) or not 0.0 <= o.warmup < 1.0:
            raise ValueError(f"{owner}: warmup must be a fraction of the iterations in [0, 1); got {o.warmup!r}")
        self.warmup = float(o.warmup)
        self.temperature = check_float(o.temperature, "temperature", owner, positive=True)

    def _set_bn(self, o: SimpleNamespace, owner: str, teacher: nn.Module) -> None:
        """The BatchNorm-statistic term; dropped, with a warning, for a teacher without BN running statistics."""
        self.bn_weight = check_float(o.bn_weight, "bn_weight", owner)
        self.first_bn_multiplier = check_float(o.first_bn_multiplier, "first_bn_multiplier", owner)
        self.bn_form = check_choice(o.bn_form, "bn_form", owner, BN_LOSS_FORMS)
        has_bn = any(isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
                     for m in teacher.modules())
        if self.bn_weight > 0 and not has_bn:
            warnings.warn(
                f"{owner}: the teacher ({type(teacher).__name__}) has no BatchNorm layer with running "
                "statistics; synthesising with the priors only (bn_weight is ignored)", stacklevel=4,
            )
            self.bn_weight = 0.0

    def _set_priors(self, o: SimpleNamespace, owner: str) -> None:
        """The image priors' weights and the blur prior's Gaussian."""
        self.prior_weights = {name: check_float(getattr(o, f"{name}_weight"), f"{name}_weight", owner)
                              for name in PRIORS}
        if o.blur_kernel_size not in (3, 7):
            raise ValueError(f"{owner}: blur_kernel_size must be 3 or 7; got {o.blur_kernel_size!r}")
        self.blur_kernel_size = o.blur_kernel_size
        self.blur_sigma = (None if o.blur_sigma is None
                           else check_float(o.blur_sigma, "blur_sigma", owner, positive=True))
        self.blur_per_sample_norm = bool(o.blur_per_sample_norm)

    def _set_inputs(self, o: SimpleNamespace, owner: str) -> None:
        """The augmentation, the clip to the pixel range, the kept batch and the initial inputs' spread."""
        _, h, w = self.input_shape
        jitter = o.jitter
        if jitter is None:
            jitter = 2 if max(h, w) <= 64 else max(1, round(30 * max(h, w) / 224))
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise ValueError(f"{owner}: jitter must be an int >= 0 (pixels) or None; got {jitter!r}")
        self.jitter = jitter
        self.flip = bool(o.flip)
        if isinstance(o.pad_crop, bool) or not isinstance(o.pad_crop, int) or o.pad_crop < 0:
            raise ValueError(f"{owner}: pad_crop must be an int >= 0; got {o.pad_crop!r}")
        self.pad_crop = o.pad_crop
        self.augment_per = check_choice(o.augment_per, "augment_per", owner, AUGMENT_PER)
        self.clip = bool(o.clip) and self.mean is not None
        self.keep_best = bool(o.keep_best)
        self.init_std = check_float(o.init_std, "init_std", owner, positive=True)

    def _set_competition(self, o: SimpleNamespace, owner: str) -> None:
        """Adaptive DeepInversion: the competitor and its term."""
        if o.competitor is not None and not isinstance(o.competitor, nn.Module):
            raise TypeError(f"{owner}: competitor must be an nn.Module or None; got {type(o.competitor).__name__}")
        self.competitor = o.competitor
        self.competition_weight = check_float(o.competition_weight, "competition_weight", owner)
        if o.competitor is not None and self.competition_weight == 0:
            raise ValueError(f"{owner}: a competitor needs competition_weight > 0")
        self.competition_temperature = check_float(o.competition_temperature, "competition_temperature", owner,
                                                   positive=True)
        lo, hi = o.competition_clamp
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"{owner}: competition_clamp must be (low, high) with 0 <= low < high <= 1; "
                             f"got {o.competition_clamp!r}")
        self.competition_clamp = (float(lo), float(hi))
        self.competition_form = check_choice(o.competition_form, "competition_form", owner, JS_FORMS)

    def _set_execution(self, o: SimpleNamespace, owner: str, teacher: nn.Module) -> None:
        """How a step runs: precision, memory format, CUDA graph, torch.compile, multi-resolution, logging."""
        self.precision = check_choice(o.precision, "precision", owner, PRECISIONS)
        channels_last = o.channels_last
        if channels_last is None:
            channels_last = auto_channels_last(teacher, self.device, o.precision)
        self.channels_last = bool(channels_last)
        if not isinstance(o.compile, (bool, dict)):
            raise TypeError(f"{owner}: compile must be a bool or a dict of torch.compile arguments; "
                            f"got {type(o.compile).__name__}")
        # None (auto): on CUDA without torch.compile, capture the step; a step that cannot be captured (a host
        # sync in the teacher's forward, say) then runs eagerly with a warning instead of failing.
        self._cuda_graph_auto = o.cuda_graph is None
        self.cuda_graph = (self.device.type == "cuda" and not o.compile) if o.cuda_graph is None else bool(o.cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"{owner}: cuda_graph=True needs a CUDA device; this synthesizer runs on {self.device} "
                "(pass device='cuda' with a CUDA teacher, or cuda_graph=False)"
            )
        self.compile = o.compile
        self.multi_resolution = self._checked_multi_resolution(o.multi_resolution, owner)
        if o.log_every is not None and (isinstance(o.log_every, bool) or not isinstance(o.log_every, int)
                                        or o.log_every < 1):
            raise ValueError(f"{owner}: log_every must be an int >= 1 or None; got {o.log_every!r}")
        self.log_every = o.log_every

    def _checked_multi_resolution(self, value, owner: str) -> tuple[float, float] | None:
        if value is None:
            return None
        _, h, w = self.input_shape
        try:
            scale, fraction = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{owner}: multi_resolution must be None or (scale, fraction); "
                             f"got {value!r}") from None
        if not 0.0 < scale < 1.0 or not 0.0 < fraction < 1.0:
            raise ValueError(f"{owner}: multi_resolution (scale, fraction) must both be in (0, 1); got {value!r}")
        if min(round(h * scale), round(w * scale)) < 1:
            raise ValueError(f"{owner}: multi_resolution scale {scale} leaves no pixel of {h}x{w}")
        return (scale, fraction)

    def _set_stopping(self, o: SimpleNamespace, owner: str) -> None:
        """Early stopping and the low-agreement warning."""
        if o.stop_when is not None and o.stop_when != "converged" and not callable(o.stop_when):
            raise ValueError(f"{owner}: stop_when must be None, 'converged' or a callable (step, terms) -> bool; "
                             f"got {o.stop_when!r}")
        self.stop_when = o.stop_when
        self.stop_agreement = check_float(o.stop_agreement, "stop_agreement", owner)
        if not 0.0 <= self.stop_agreement <= 1.0:
            raise ValueError(f"{owner}: stop_agreement must be in [0, 1]; got {o.stop_agreement!r}")
        if o.stop_patience is not None and (isinstance(o.stop_patience, bool) or not isinstance(o.stop_patience, int)
                                            or o.stop_patience < 1):
            raise ValueError(f"{owner}: stop_patience must be an int >= 1 (steps) or None; got {o.stop_patience!r}")
        self.stop_patience = o.stop_patience
        self.stop_tol = check_float(o.stop_tol, "stop_tol", owner)
        #: steps each batch of the latest job ran (fewer than ``iterations`` where ``stop_when`` stopped it)
        self.steps_run: list[int] = []
        if o.warn_below is not None and (isinstance(o.warn_below, bool) or not isinstance(o.warn_below, (int, float))
                                         or not 0.0 < o.warn_below <= 1.0):
            raise ValueError(f"{owner}: warn_below must be a fraction in (0, 1] or None; got {o.warn_below!r}")
        self.warn_below = None if o.warn_below is None else float(o.warn_below)

    # -- description -------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(
            lr=self.lr, betas=list(self.betas), adam_eps=self.adam_eps, schedule=self.schedule,
            warmup=self.warmup, temperature=self.temperature, bn_weight=self.bn_weight,
            first_bn_multiplier=self.first_bn_multiplier, bn_form=self.bn_form,
            priors=dict(self.prior_weights), blur_kernel_size=self.blur_kernel_size,
            blur_sigma=self.blur_sigma, blur_per_sample_norm=self.blur_per_sample_norm,
            jitter=self.jitter, flip=self.flip, pad_crop=self.pad_crop, clip=self.clip,
            keep_best=self.keep_best, init_std=self.init_std,
            competitor=None if self.competitor is None else type(self.competitor).__name__,
            competition_weight=self.competition_weight,
            competition_temperature=self.competition_temperature,
            competition_clamp=list(self.competition_clamp), competition_form=self.competition_form,
            precision=self.precision,
            multi_resolution=None if self.multi_resolution is None else list(self.multi_resolution),
        )
        if self.augment_per != "sample":  # recorded only when not the default, as stop_when below
            cfg["augment_per"] = self.augment_per
        if self.stop_when is not None:  # recorded only when set: manifests of jobs without it are unchanged
            cfg.update(stop_when=self.stop_when if isinstance(self.stop_when, str) else "callable",
                       stop_agreement=self.stop_agreement, stop_patience=self.stop_patience,
                       stop_tol=self.stop_tol)
        return cfg

    def term_names(self) -> list[str]:
        """Names of the entries of the loss-term vector one step returns."""
        names = ["total", "main"]
        if self.bn_weight > 0:
            names.append("bn")
        names += [k for k in PRIORS if self.prior_weights[k] > 0]
        if self.competitor is not None:
            names.append("competition")
        names.append("teacher_acc")
        return names

    # -- set-up held for one batch ---------------------------------------------------
    @contextlib.contextmanager
    def _session(self):
        """Teacher (and competitor) in eval mode, frozen, in the chosen memory format; BN hooks on.

        Everything is put back on exit, also after an exception: training
        flags, requires_grad flags, memory formats, hooks.
        """
        models = [self.teacher] + ([self.competitor] if self.competitor is not None else [])
        with contextlib.ExitStack() as stack:
            for m in models:
                stack.enter_context(frozen(m, channels_last=self.channels_last))
                if self.device.type == "cpu" and self.precision == "fp32" and not self.compile:
                    # Only the input gradient is needed: for the layers where it was measured to
                    # win (few input channels), one convolution instead of oneDNN's backward.
                    stack.enter_context(input_grad_convs(m))
                if self.device.type == "cpu" and not self.compile:
                    # Stride = kernel max/avg pooling (LeNet's) in one pass each way instead of PyTorch's NCHW
                    # kernels (over a quarter of a LeNet-5-BN step: exml_fast.ops.window_pool), and nn.Tanh
                    # vectorised (PyTorch's CPU tanh is a scalar loop, 15 % of a LeNet-5 MI step: ops.tanh).
                    stack.enter_context(fast_layers(m))
            if self.bn_weight > 0:
                # fused: each eval-mode BN layer and its statistics in one pass each way (CPU).
                self._matcher = stack.enter_context(
                    BNStatsMatcher(self.teacher, form=self.bn_form, first_bn_multiplier=self.first_bn_multiplier,
                                   fused=not self.compile)
                )
            else:
                self._matcher = None
            try:
                yield
            finally:
                self._matcher = None

    def _run(self, labels, bounds, iterations, seed, store, progress):
        self.steps_run = []
        yield from super()._run(labels, bounds, iterations, seed, store, progress)

    # -- one batch ----------------------------------------------------------------------
    def _targets(self, labels: torch.Tensor, generator: torch.Generator, offset: int) -> torch.Tensor | None:
        """Per-sample soft targets (B, K) for the "soft" objective; None for "ce"."""
        return None

    def _synthesize_batch(self, labels, *, iterations, generator, offset, progress) -> SyntheticBatch:
        b = labels.shape[0]
        c, h, w = self.input_shape
        soft = self._targets(labels, generator, offset)
        if self.multi_resolution is None:
            phases = [((h, w), iterations)]
        else:
            scale, fraction = self.multi_resolution
            low = (max(1, round(h * scale)), max(1, round(w * scale)))
            first = min(iterations - 1, max(1, round(iterations * fraction))) if iterations > 1 else 0
            phases = [(low, first), ((h, w), iterations - first)] if first > 0 else [((h, w), iterations)]
        size0 = phases[0][0]
        if len(phases) > 1:
            self._check_low_resolution(size0)
        # Drawn on the CPU from the batch's generator: the same seed gives the same
        # start on every device.
        x = torch.randn((b, c, *size0), generator=generator) * self.init_std
        x = x.to(self.device)
        ran = 0
        with self._session():
            for j, (size, steps) in enumerate(phases):
                if tuple(x.shape[2:]) != tuple(size):
                    x = F.interpolate(x, size=size, mode="nearest")
                x, terms, done = self._optimise(x, labels, soft, steps, generator, progress,
                                                final_phase=j == len(phases) - 1)
                ran += done
        self.steps_run.append(ran)
        names = self.term_names()
        losses = {k: terms[j : j + 1].float().cpu() for j, k in enumerate(names)}
        batch = SyntheticBatch(x.contiguous(), labels, soft, losses, self.mean, self.std)
        self._check_agreement(batch)
        return batch

    # -- after a batch: does the teacher see the targets? ---------------------------------
    def _agreement(self, batch: SyntheticBatch) -> float:
        """Fraction of ``batch`` the teacher labels as its target: the kept step's "teacher_acc", as the exact
        count over the batch (the float32 mean of 18 of 20 is 0.89999998, under a threshold of 0.9)."""
        n = len(batch.y)
        return round(float(batch.losses["teacher_acc"][0]) * n) / n

    def weighted_terms(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each loss term of a batch's ``losses`` times its weight (what the total sums), by name."""
        weights = {"main": 1.0, "bn": self.bn_weight, **self.prior_weights, "competition": self.competition_weight}
        return {k: float(losses[k].reshape(-1)[0]) * weights[k] for k in self.term_names()
                if k in weights and k in losses}

    def _hints(self) -> dict[str, str]:
        """Advice by dominant term for the low-agreement warning ("*": always added)."""
        hints = {"main": "the optimisation has not converged: more iterations or a larger lr",
                 "bn": "lower bn_weight",
                 "competition": "lower competition_weight"}
        hints.update({k: f"lower {k}_weight" for k in PRIORS})
        if self.flip:
            hints["*"] = ("flips are on (flip=True): a mirrored digit or letter is another class; "
                          "flip=False unless the classes are mirror-symmetric")
        return hints

    def _check_agreement(self, batch: SyntheticBatch) -> None:
        """Warns once per synthesizer (LowAgreementWarning) when the teacher's agreement is below warn_below."""
        if self.warn_below is None or self._warned_agreement:
            return
        agreement = self._agreement(batch)
        if agreement >= self.warn_below:
            return
        self._warned_agreement = True
        what = "its target class" if self.objective == "ce" else "the argmax of its soft target"
        warnings.warn(agreement_message(type(self).__name__, agreement=agreement, threshold=self.warn_below,
                                        weighted=self.weighted_terms(batch.losses), hints=self._hints(),
                                        what=what), LowAgreementWarning, stacklevel=stacklevel_outside_synth())

    def _check_low_resolution(self, size) -> None:
        c = self.input_shape[0]
        try:
            with eval_mode(self.teacher), torch.no_grad():
                self.teacher(torch.zeros((1, c, *size), device=self.device))
        except Exception as e:
            raise ValueError(
                f"{type(self).__name__}: multi_resolution={self.multi_resolution} needs a teacher that accepts "
                f"{(c, *size)} inputs (global pooling); {type(self.teacher).__name__} failed on one: {e}"
            ) from e

    def _optimise(self, x0, labels, soft, steps, generator, progress, final_phase=True):
        """Runs ``steps`` Adam steps from ``x0`` (fewer when ``stop_when`` stops the final phase);
        returns (kept x, its loss terms, the steps run)."""
        b, c, h, w = x0.shape
        dev = self.device
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        st = _State()
        st.x = x0.to(dev, torch.float32).contiguous(memory_format=fmt)
        # Made before any step: a CUDA graph cannot capture the host-to-device copy.
        st.bounds = self.pixel_range if self.clip else None
        if st.bounds is not None:
            st.x.clamp_(*st.bounds)
        st.x.requires_grad_(True)
        st.m = torch.zeros_like(st.x)
        st.v = torch.zeros_like(st.x)
        st.best_x = st.x.detach().clone()
        st.best_loss = torch.full((), math.inf, device=dev)
        st.best_terms = torch.zeros(len(self.term_names()), device=dev)
        st.labels = labels
        st.soft = soft
        st.scale = torch.full((), _FP16_INIT_SCALE if self.precision == "fp16" else 1.0, device=dev)
        st.good_steps = torch.zeros((), dtype=torch.int64, device=dev)
        # Per-step Adam scalars: (step size lr_t / (1 - b1^t), 1 / sqrt(1 - b2^t)).
        lrs = lr_table(self.lr, steps, schedule=self.schedule, warmup=self.warmup)
        t = torch.arange(1, steps + 1, dtype=torch.float64)
        b1, b2 = self.betas
        scalars = torch.stack([lrs / (1 - b1**t), 1 / torch.sqrt(1 - b2**t)], 1).to(dev, torch.float32)
        jitter = self.jitter if (h, w) == tuple(self.input_shape[1:]) else max(
            0, round(self.jitter * h / self.input_shape[1]))
        augments = jitter > 0 or self.flip or self.pad_crop > 0

        step = self._step_fn()
        runner = _GraphStep(self, st, step, augments) if self.cuda_graph else None
        log_every = self.log_every or max(1, min(50, steps // 20 or 1))
        stopper = _Stopper(self, steps) if self.stop_when is not None and final_phase else None
        table = None
        terms = None
        last_report = 0
        done = steps
        per_batch = self.augment_per == "batch"
        for i in range(steps):
            if augments and i % _AUG_CHUNK == 0:
                k = min(_AUG_CHUNK, steps - i)
                table = draw_augment_params(
                    k if per_batch else k * b, max_shift=jitter, flip=self.flip, pad_crop=self.pad_crop,
                    generator=generator,
                ).view(k, 1 if per_batch else b, 5).expand(k, b, 5).contiguous().to(dev, non_blocking=True)
            params = table[i % _AUG_CHUNK] if augments else None
            if runner is not None:
                terms = runner(params, scalars[i])
            else:
                terms = step(st, params, scalars[i])
            if (i + 1) % log_every == 0 or i + 1 == steps:
                vals = terms.tolist()  # the only host sync, once per refresh
                names = self.term_names()
                post = {k: v for k, v in zip(names, vals) if k not in ("total",)}
                post = {"loss": vals[0], **post}
                if stopper is not None and i + 1 < steps and stopper(i + 1, dict(zip(names, vals))):
                    progress(steps - last_report, {**post, "stopped": i + 1})
                    done = i + 1
                    break
                progress(i + 1 - last_report, post)
                last_report = i + 1
        if self.keep_best:
            return st.best_x.detach(), st.best_terms, done
        return st.x.detach(), terms, done

    # -- the step ---------------------------------------------------------------------
    def _step_fn(self):
        loss = self._loss
        if self.compile:
            if self._compiled is None:
                kwargs = {} if self.compile is True else dict(self.compile)
                self._compiled = torch.compile(self._loss, **kwargs)
            loss = self._compiled

        def step(st, params, scalars):
            total, terms = loss(st.x, params, st.labels, st.soft)
            scaled = total * st.scale if self.precision == "fp16" else total
            (g,) = torch.autograd.grad(scaled, st.x)
            with torch.no_grad():
                self._update(st, g, total.detach(), terms, scalars)
            return terms

        return step

    def _loss(self, x, params, labels, soft):
        """(total loss, detached vector of the terms named by term_names()) for inputs x."""
        # The parameters come from draw_augment_params: valid by construction, so no value check (a host read).
        xa = augment_with_params(x, params, pad_crop=self.pad_crop, check_values=False) if params is not None else x
        autocast = autocast_to(self.device.type, PRECISIONS[self.precision])
        with autocast:
            logits = self.teacher(xa)
        logits = logits.float()
        if self.objective == "ce":
            main = F.cross_entropy(logits / self.temperature if self.temperature != 1.0 else logits, labels)
        else:
            main = soft_target_cross_entropy(logits, soft, temperature=self.temperature)
        parts = [main]
        total = main
        if self.bn_weight > 0:
            r_bn = self._matcher.loss()
            total = total + self.bn_weight * r_bn
            parts.append(r_bn)
        pw = self.prior_weights
        if any(pw[k] > 0 for k in PRIORS):
            p = image_priors(x, blur_kernel_size=self.blur_kernel_size, blur_sigma=self.blur_sigma,
                             blur_per_sample_norm=self.blur_per_sample_norm)
            n = x.shape[0]
            # Only the terms in use are formed (each is a node in the step's graph).
            values = {"tv_l1": lambda: p[0], "tv_l2": lambda: p[1], "blur": lambda: p[2] / n,
                      "l2": lambda: p[3].sqrt(), "l2_sq": lambda: p[3] / n}
            for k in PRIORS:
                if pw[k] > 0:
                    v = values[k]()
                    total = total + pw[k] * v
                    parts.append(v)
        if self.competitor is not None:
            with autocast:
                s_logits = self.competitor(xa)
            js = js_divergence(logits, s_logits.float(), temperature=self.competition_temperature,
                               clamp=self.competition_clamp, form=self.competition_form)
            comp = 1.0 - js.clamp(0.0, 1.0)
            total = total + self.competition_weight * comp
            parts.append(comp)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        terms = torch.stack([total.detach()] + [q.detach().float() for q in parts] + [acc])
        return total, terms

    def _update(self, st, g, total, terms, scalars) -> None:
        """Best-batch selection, one Adam step and the clip, all on the device."""
        x = st.x
        if self.keep_best:
            # The loss of this step was measured at x before the update: keep a copy of it.
            better = total < st.best_loss
            st.best_loss.copy_(torch.where(better, total, st.best_loss))
            st.best_x.copy_(torch.where(better, x, st.best_x))
            st.best_terms.copy_(torch.where(better, terms, st.best_terms))
        b1, b2 = self.betas
        if self.precision == "fp16":
            g = g / st.scale
            finite = torch.isfinite(g).all()
            g = torch.where(finite, g, torch.zeros((), device=g.device))
            m_new = torch.lerp(st.m, g, 1 - b1)
            v_new = st.v * b2 + (1 - b2) * g * g
            step_x = scalars[0] * m_new / (v_new.sqrt() * scalars[1] + self.adam_eps)
            st.m.copy_(torch.where(finite, m_new, st.m))
            st.v.copy_(torch.where(finite, v_new, st.v))
            x.sub_(torch.where(finite, step_x, torch.zeros((), device=g.device)))
            grown = st.good_steps + 1 >= _FP16_GROWTH_INTERVAL
            st.scale.copy_(torch.where(finite, torch.where(grown, st.scale * 2, st.scale), st.scale * 0.5))
            st.good_steps.copy_(torch.where(finite & ~grown, st.good_steps + 1, torch.zeros_like(st.good_steps)))
        else:
            st.m.lerp_(g, 1 - b1)
            st.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = st.v.sqrt().mul_(scalars[1]).add_(self.adam_eps)
            x.sub_(st.m / denom * scalars[0])
        if st.bounds is not None:
            x.clamp_(*st.bounds)


class _State:
    """The static tensors of one optimisation (a plain namespace)."""


class _Stopper:
    """``stop_when`` of one optimisation, asked at each progress refresh (the loss terms are on the host then).

    "converged": the teacher agrees with at least ``stop_agreement`` of the batch and the lowest total loss
    seen has improved by less than ``stop_tol`` (relative) over the last ``stop_patience`` steps (None: a
    tenth of the iterations, at least 50). A callable is called as ``stop_when(step, terms)`` with the step
    count and the terms by name (``term_names()``; ``"teacher_acc"`` is the agreement).
    """

    def __init__(self, synth: _Inversion, steps: int) -> None:
        self.synth = synth
        self.patience = synth.stop_patience or max(50, steps // 10)
        self.best: list[tuple[int, float]] = []  # (step, lowest total so far) at each check

    def __call__(self, step: int, terms: dict[str, float]) -> bool:
        s = self.synth
        if s.stop_when != "converged":
            return bool(s.stop_when(step, terms))
        lowest = min(terms["total"], self.best[-1][1]) if self.best else terms["total"]
        self.best.append((step, lowest))
        if terms["teacher_acc"] < s.stop_agreement or step < self.patience:
            return False
        then = [v for k, v in self.best if k <= step - self.patience]
        if not then:
            return False
        return then[-1] - lowest <= s.stop_tol * abs(then[-1])


#: What torch's sync debug mode "warn" says of a synchronising CUDA call (c10::cuda::warn_or_error_on_sync).
_SYNC_WARNING = "called a synchronizing CUDA operation"
#: The notice torch gives once a process when the mode is first set: not a sync.
_SYNC_MODE_NOTICE = "Synchronization debug mode is a prototype feature"


class _GraphStep:
    """One optimisation step captured in a CUDA graph and replayed.

    The first three steps run eagerly on a side stream (CUDA graphs need the
    allocator and the kernels' lazy initialisation warmed up, and they are real
    steps of the optimisation); the fourth is captured, and every later one is a
    replay. Inputs that change per step — the augmentation parameters and the
    Adam scalars — are copied into static buffers before each replay.

    A step that synchronises with the host (a teacher whose forward reads a
    value, say) cannot be captured, and a failed capture leaves the process's
    current stream and allocator mid-capture. So the first warm-up step runs with
    PyTorch's sync debug mode on "warn": if it synchronised, nothing is captured;
    with ``cuda_graph=None`` (auto) every step then runs eagerly, with a
    RuntimeWarning, and with ``cuda_graph=True`` it is an error naming the sync.
    """

    WARMUP = 3

    def __init__(self, synth: _Inversion, st: _State, step, augments: bool) -> None:
        self.synth, self.st, self.step, self.augments = synth, st, step, augments
        self.calls = 0
        self.graph = None
        self.eager = False  # the step synchronises (auto mode): every step runs eagerly
        self.stream = torch.cuda.Stream(device=synth.device)
        self.params = None
        self.scalars = None
        self.terms = None

    def _warmup(self, params, scalars):
        self.stream.wait_stream(torch.cuda.current_stream(self.synth.device))
        with torch.cuda.stream(self.stream):
            if self.calls > 1:
                out = self.step(self.st, params, scalars)
            else:
                out, syncs = self._probed(params, scalars)
                if syncs:
                    self._refuse(syncs)
        torch.cuda.current_stream(self.synth.device).wait_stream(self.stream)
        return out

    def _probed(self, params, scalars):
        """One step with the sync debug mode on "warn"; (its terms, the sync warnings' first lines)."""
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = self.step(self.st, params, scalars)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        syncs = [str(w.message).splitlines()[0] for w in seen if _SYNC_WARNING in str(w.message)]
        for w in seen:  # the step's other warnings, passed on; torch's one-time notice on the mode dropped
            text = str(w.message)
            if _SYNC_WARNING not in text and _SYNC_MODE_NOTICE not in text:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out, syncs

    def _refuse(self, syncs: list[str]) -> None:
        name = type(self.synth).__name__
        what = f"the step synchronises with the host ({syncs[0]})"
        if not self.synth._cuda_graph_auto:
            raise RuntimeError(f"{name}: cuda_graph=True, but {what}, so it cannot be captured in a CUDA graph; "
                               "pass cuda_graph=False, or None to capture only where it can")
        self.eager = True
        warnings.warn(f"{name}: {what}, so it is not captured in a CUDA graph and runs eagerly "
                      "(cuda_graph=False silences this)", RuntimeWarning, stacklevel=stacklevel_outside_synth())

    def __call__(self, params, scalars):
        self.calls += 1
        if self.eager:
            return self.step(self.st, params, scalars)
        if self.graph is None and self.calls <= self.WARMUP:
            return self._warmup(params, scalars)
        if self.graph is None:
            self.params = None if params is None else params.clone()
            self.scalars = scalars.clone()
            self.graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(self.synth.device)
            with torch.cuda.graph(self.graph):
                self.terms = self.step(self.st, self.params, self.scalars)
        else:
            if params is not None:
                self.params.copy_(params, non_blocking=True)
            self.scalars.copy_(scalars, non_blocking=True)
        self.graph.replay()
        return self.terms


# -- the three methods -------------------------------------------------------------------


class ModelInversion(_Inversion):
    """Model inversion (the Ex-Model CL paper's MI generator).

    Minimises ``CE(teacher(A(x)) / τ, y)`` plus image priors (and the BN
    statistic loss when ``bn_weight > 0`` and the teacher has BatchNorm) over
    random inputs ``x ~ N(0, init_std²)``. Defaults are the paper's MNIST
    settings (Appendix B): Adam lr 0.01, 3000 iterations, τ 2, blur 1e-3
    (on the default squared 3 × 3 form, about 20 times the reference code's
    per-image norm that weight was tuned for; see ``blur_per_sample_norm``),
    L2 1e-3 (``l2_sq_weight``, ‖x‖² per image), here with per-sample jitter of
    2 px and no flip (digits). The BN term takes the paper's form
    ``Σ_l ‖μ_l − μ̂_l‖² + ‖σ_l − σ̂_l‖²`` (``bn_form="sq_std"``; DeepInversion's
    un-squared norms of the mean and variance gaps are ``bn_form="l2"``) with
    ``bn_weight="auto"``: ``ln K / R_BN(noise)``, the weight at which the BN
    term of a batch of noise equals the cross-entropy of a uniform guess (the
    rule of :class:`DeepInversion`'s ``auto`` preset; 0 without BatchNorm). The
    paper's BNS 1.0 was set for BN-free LeNets; on BN teachers it buries the
    cross-entropy: with it a LeNet-5-BN teacher labels 40 % of 20 images as
    their target after 400 steps (95 % after 3000), a slim ResNet-18 or
    MobileNetV2 about 10 %; with ``auto`` LeNet-5-BN reaches 100 % in 200 steps
    (figures for the whole zoo in ``benches/results/zoo_agreement_cpu.md``).

    Args:
        teacher: any classifier ``nn.Module`` mapping (N, C, H, W) to (N, K) logits.
        input_shape: (C, H, W) of one input.
        mean, std: the teacher's input normalisation (float or per channel);
            ``x`` is clipped to the normalised image of [0, 1] after each step.
            None: no clipping.
        temperature: τ of the cross-entropy.
        bn_weight: a number >= 0, or "auto" (above).
        See :class:`DeepInversion` for every other option.
    """

    method = "model-inversion"

    #: ModelInversion's own defaults over the engine's (ENGINE_DEFAULTS); the paper's MNIST settings.
    DEFAULTS = {"temperature": 2.0, "lr": 0.01, "iterations": 3000, "batch_size": 256, "bn_weight": "auto",
                "bn_form": "sq_std", "blur_weight": 1e-3, "l2_sq_weight": 1e-3, "flip": False, "schedule": "constant"}

    def __init__(self, teacher: nn.Module, *, input_shape: Sequence[int], mean=None, std=None,
                 settings: InversionSettings | None = None, **kwargs) -> None:
        owner = type(self).__name__
        given = merge_settings(settings, kwargs, owner)
        check_names(given, owner, allowed=("num_classes", "device"))
        kwargs = {**self.DEFAULTS, **given}
        bn_weight = kwargs["bn_weight"]
        self.bn_weight_auto = isinstance(bn_weight, str)
        if self.bn_weight_auto:
            if bn_weight != "auto":
                raise ValueError(f"{owner}: bn_weight must be a number >= 0 or 'auto'; got {bn_weight!r}")
            kwargs["bn_weight"], k = measured_bn_weight(teacher, input_shape, given, form=kwargs["bn_form"],
                                                        owner=owner)
            if kwargs.get("num_classes") is None:
                kwargs["num_classes"] = k  # the probe's forward found it: the synthesizer need not make another
        super().__init__(teacher, input_shape=input_shape, mean=mean, std=std, **kwargs)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["bn_weight_auto"] = self.bn_weight_auto
        return cfg


class DeepInversion(_Inversion):
    """DeepInversion (Yin et al., CVPR 2020), and Adaptive DeepInversion with ``competitor``.

    Minimises over random inputs ``x``::

        CE(teacher(A(x)), y) + bn_weight · Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂)
          + tv_l1_weight · R_TV,l1 + tv_l2_weight · R_TV,l2 + l2_weight · ‖x‖₂
          [+ competition_weight · (1 − JS(p_teacher, p_competitor))]

    with the statistics of every BatchNorm layer's input (w = first_bn_multiplier
    for the first layer, 1 for the others), a per-sample random jitter (roll by
    up to ``jitter`` px) and, with ``flip``, a random horizontal flip ``A`` drawn
    anew each step, Adam (optionally with a cosine schedule after a linear
    warm-up), ``x`` clipped to the valid pixel range after each step, and the
    batch with the lowest loss kept (a copy).

    **Presets.** ``preset`` names the settings every argument not passed comes
    from (:data:`~exml_fast.synth.DEEPINVERSION_PRESETS`, sources there);
    arguments passed explicitly always win, and ``config()`` records the
    resolved settings and the preset's name (both go into synthesis manifests):

    - ``"auto"`` (the default): settings picked from the teacher, so that the
      teacher labels the images as their targets on the classifiers people have
      (the rule is below);
    - ``"cifar"`` (also ``"cifar10"``, its older name): the paper's CIFAR-10
      setting as the public CIFAR-10 script runs it, the defaults before
      ``auto``: Adam lr 0.05 at a constant rate, 2000 iterations, batch 256,
      α_f 10 with no first-layer multiplier, α_tv 2.5e-5 (l2 form), α_l2 0,
      jitter 2 px at 32 px and flips;
    - ``"imagenet"``: the public ImageNet recipe (3 x 224 x 224 under the
      torchvision normalisation, Adam lr 0.25, betas (0.5, 0.9), cosine after a
      warm-up, first BN layer ×10, α_f 0.01, α_tv 1e-4, α_l2 1e-5, multi-resolution,
      flips), also :meth:`imagenet`;
    - ``"digits"``: 32 x 32 grey-scale digits and clothes (BN 1 with the first
      layer ×10, α_tv 0.05, ‖x‖² 1e-3 per image, Adam lr 0.1, no flips), what
      ``exml-fast synthesize`` uses for MNIST / Fashion-MNIST teachers.

    **The auto rule.** Flips stay off (a mirrored digit, letter or traffic
    sign is another class; pass ``flip=True`` or a paper's preset for
    mirror-symmetric classes). Inputs with a side under 128 px take the
    ``cifar`` optimiser and priors (Adam lr 0.05, constant, α_tv 2.5e-5, no
    first-layer multiplier); larger ones the ``imagenet`` recipe without
    multi-resolution (not measured here: no ImageNet teacher is at hand). The BN
    weight is measured on the teacher: one forward of 16 noise images gives the
    BN term at the start of a synthesis, ``R_BN(noise)``, and
    ``bn_weight = ln K / R_BN(noise)``, so that the weighted BN term of noise
    equals the cross-entropy of a uniform guess over the K classes; 0 (priors
    only, no warning) for teachers without BatchNorm. Why: the BN term is a
    sum over layers of un-squared norms over channels, so its size grows with
    depth and width — R_BN(noise) is 15 on LeNet-5-BN (4 BN layers), 510 on a
    slim ResNet-18 (20) and 2500 on MobileNetV2 (52), trained briefly on
    1 x 32 x 32 digits or clothes — while the cross-entropy it competes with
    does not; a fixed weight that suits one is 100 times off for another, and
    a count of the layers alone misses the widths. With the measured weight the
    kept batch's BN term ends below that of a batch of as many real training
    images (LeNet-5-BN 3.9 vs 5.2, ResNet-18 97 vs 225, MobileNetV2 480 vs 620:
    the statistics are matched as well as data matches them) while the teacher
    agrees. Measured on the zoo of ``python_tests/synth/test_zoo.py``
    (``benches/zoo_agreement.py``, recorded in
    ``benches/results/zoo_agreement_cpu.md``; 20 images in one batch, two
    seeds), teacher agreement with the old defaults (``cifar``) → ``auto``:
    LeNet-5-BN 50/45 % → 100/100 % (200 steps), slim ResNet-18 10/15 % →
    100/100 % (200), MobileNetV2 10/5 % → 100/100 % (400); BN-free LeNet-5 and
    a GroupNorm CNN 100 % either way. A LeNet-5-BN trained one epoch on MNIST
    (98.2 %), 100 images at every default (2000 steps): 74/77 % → 100/100 %.

    Args:
        teacher: any classifier ``nn.Module`` mapping (N, C, H, W) to (N, K)
            logits. Without BatchNorm layers the BN term is dropped (with an
            explicit ``bn_weight > 0`` a warning says so) and the priors alone
            regularise.
        input_shape: (C, H, W) of one input (``auto`` needs it; ``imagenet``
            has its own).
        mean, std: the teacher's input normalisation (float or per channel),
            which defines the valid pixel range x is clipped to; None: no clip.
        preset: "auto" | "cifar" | "cifar10" | "imagenet" | "digits" (above).
        num_classes: the teacher's outputs (None: one forward finds out).
        device: where to synthesise (None: the teacher's device).
        iterations, batch_size: defaults for :meth:`synthesize`.
        lr, betas, adam_eps: Adam's settings; ``schedule`` "cosine" | "constant"
            after a linear ``warmup`` over that fraction of the iterations.
        temperature: τ of the cross-entropy.
        bn_weight, first_bn_multiplier, bn_form: the BN-statistic term
            ("l2" DeepInversion — its default —, "mse", "sq_std" the ExML
            paper's — the default of ModelInversion and DataImpressions —;
            see BNStatsMatcher).
        tv_l1_weight, tv_l2_weight, blur_weight, l2_weight, l2_sq_weight: prior
            weights. tv_l1 = Σ_k mean|D_k| and tv_l2 = Σ_k ‖D_k‖_F over the four
            one-pixel shifts of the batch; l2 = ‖x‖₂ over the batch
            (DeepInversion's forms, batch-size dependent as in its code);
            blur = ‖x − G∗x‖² and l2_sq = ‖x‖², each averaged over the images.
            All from one fused :func:`exml_fast.ops.image_priors` pass.
        blur_kernel_size, blur_sigma, blur_per_sample_norm: the blur prior's
            Gaussian (3 or 7; sigma None: 0.8 for 3, 1.0 for 7 as in the
            Ex-Model CL reference code) and form: with
            ``blur_per_sample_norm`` the per-image non-squared norm
            ‖x_n − G∗x_n‖₂, averaged over the images (the reference code's
            form, with 7 and sigma 1). Mind the scale: at x ~ N(0, 1) of
            1 × 32 × 32 the default squared 3 × 3 term is about 22 times the
            reference code's per-image norm (47 times in gradient), so the
            Ex-Model CL paper's blur weights (1e-3 MNIST, 1e-2 CIFAR), tuned
            for the reference code's form, push about 20–50 times harder in
            the default form.
        jitter: largest roll in pixels (None: 2 up to 64 px, else 30·H/224);
            flip: random horizontal flips; pad_crop: random-crop padding.
            Drawn per step, and per sample (``augment_per="sample"``, the
            default) or once for the whole batch (``"batch"``, as the public
            code draws them). Per batch, a step whose draw is no shift
            optimises the un-augmented batch itself; per sample, no step
            does, which matters for a teacher whose BN layers see positions
            (LeNet-5-BN's BatchNorm1d after the flatten): there the returned
            images' own BN term stays about twice the one optimised.
        clip: clip x to the valid pixel range (needs mean/std).
        keep_best: return the batch with the lowest total loss seen (its
            copy), else the last one.
        init_std: x starts as N(0, init_std²).
        competitor: a student network: Adaptive DeepInversion. The term is
            1 − JS of the two softmaxes at ``competition_temperature``,
            probabilities clamped to ``competition_clamp``;
            ``competition_form`` "js" (the default) is the Jensen-Shannon
            divergence, "public" the public code's 0.5·KL(M‖P) + 0.5·KL(M‖Q)
            (see :func:`exml_fast.ops.js_divergence`). ``competition_weight``
            None: 10 with a competitor (the paper's α_c), else 0.
        precision: "fp32", "bf16" or "fp16": autocast for the networks' forward
            and backward; x, its gradient, Adam and every statistic stay fp32;
            fp16 uses a dynamic loss scale kept on the device.
        channels_last: run the networks in channels_last (weights converted
            for the job and put back afterwards).
        cuda_graph: capture the whole step (forward, backward, Adam, clip,
            best-batch selection) in a CUDA graph and replay it: one launch a
            step instead of hundreds, which is what bounds a small-batch step
            on a GPU. None (the default): on a CUDA device without
            ``compile``, with eager steps and a warning instead where the
            step synchronises with the host (e.g. a teacher whose forward
            reads a value), which a graph cannot hold; True: always, an error
            for such a step; False: never. True needs a CUDA device.
        compile: torch.compile the loss (True, or a dict of torch.compile
            arguments).
        multi_resolution: (scale, fraction): the first ``fraction`` of the
            iterations at ``scale`` × the resolution, then nearest upsampling
            and the rest at full resolution (the paper: (0.5, 2/3)). Needs a
            teacher that accepts the smaller input (global pooling).
        log_every: steps between progress-bar refreshes (each reads the loss
            terms from the device once); None: about 20 per batch, at most 50 apart.
        warn_below: after each batch, when the fraction of it the teacher
            labels as its target (the kept step's ``teacher_acc``) is below
            this, a :class:`~exml_fast.synth.LowAgreementWarning` with the
            weighted loss terms and a hint naming the dominant one — once per
            synthesizer. None: never.
    """

    method = "deepinversion"

    def __init__(self, teacher: nn.Module, *, input_shape: Sequence[int] | None = None, mean=None, std=None,
                 preset: str = "auto", competition_weight: float | None = None,
                 competitor: nn.Module | None = None, settings: InversionSettings | None = None,
                 **overrides: Any) -> None:
        given = merge_settings(settings, overrides, type(self).__name__)
        check_names(given, type(self).__name__, allowed=("num_classes", "device"))
        # The two keywords of their own: a value passed wins over the settings' one.
        competitor_set, weight_set = given.pop("competitor", None), given.pop("competition_weight", None)
        competitor = competitor_set if competitor is None else competitor
        competition_weight = weight_set if competition_weight is None else competition_weight
        if competition_weight is None:
            competition_weight = 10.0 if competitor is not None else 0.0
        if mean is not None or std is not None:
            given.update(mean=mean, std=std)
        self.preset_name, resolved = resolve_deepinversion(preset, teacher, input_shape=input_shape,
                                                           overrides=given, owner=type(self).__name__)
        super().__init__(teacher, competitor=competitor, competition_weight=competition_weight, **resolved)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["preset"] = self.preset_name
        return cfg

    def _hints(self) -> dict[str, str]:
        hints = super()._hints()
        other = "preset='auto'" if self.preset_name != "auto" else "preset='digits' for 32x32 grey-scale digits"
        hints["bn"] = f"lower bn_weight (now {self.bn_weight:g}) or use {other}"
        return hints

    @classmethod
    def preset(cls, name: str, teacher: nn.Module, **kwargs: Any) -> DeepInversion:
        """``DeepInversion(teacher, preset=name, **kwargs)``: the settings :data:`DEEPINVERSION_PRESETS` names
        ``name`` (or the ``auto`` rule); ``kwargs`` override them.

        Args:
            name: "auto", "cifar" (also "cifar10"), "imagenet" or "digits".
            teacher: the classifier to invert.
            kwargs: any constructor argument (``input_shape``, ``mean`` and ``std`` included).
        """
        check_choice(name, "name", "DeepInversion.preset", PRESET_NAMES)
        return cls(teacher, preset=name, **kwargs)

    @classmethod
    def imagenet(cls, teacher: nn.Module, **kwargs: Any) -> DeepInversion:
        """The public ImageNet recipe (``DEEPINVERSION_PRESETS["imagenet"]``: 3 x 224 x 224 inputs under the
        torchvision normalisation, Adam lr 0.25 with betas (0.5, 0.9), cosine after a warm-up, 2k steps at half
        resolution then 1k at full, batch 84, α_f 0.01 with the first BN layer ×10, α_tv 1e-4, α_l2 1e-5,
        jitter 30 px and flips); ``kwargs`` override any of it."""
        return cls.preset("imagenet", teacher, **kwargs)


class DataImpressions(_Inversion):
    """Data Impressions (Nayak et al., ICML 2019): inversion towards Dirichlet soft targets.

    For a sample of class k the target is ``y ~ Dir(β · c_k)``, ``c_k`` the
    k-th row of :func:`exml_fast.ops.class_similarity` of the classifier's
    weight (cosine similarities, each row min-max scaled, floored at 1e-4);
    the loss is the soft-target cross-entropy ``−Σ y log softmax(teacher(A(x))/τ)``
    (plus priors and BN matching when their weights are set). The samples of
    each class alternate between the values of ``beta`` (the paper mixes
    β = 1.0 and 0.1, half each; the Ex-Model CL paper uses β = 10). Targets
    are drawn once per batch with :func:`exml_fast.ops.dirichlet_targets` from
    the batch's generator and returned as ``soft_targets``; ``y`` is the class
    each was drawn for. Defaults: τ 20, Adam lr 0.01 (constant), 1500
    iterations, no priors, per-sample jitter 2 px without flips. With
    ``bn_weight > 0`` (the Ex-Model CL paper's DI: BNS 1.0) the BN term takes
    that paper's form by default (``bn_form="sq_std"``; "l2" is DeepInversion's).

    Mind τ against the teacher's logit scale: a target of max 0.8 at τ 20 asks
    for a gap of about 74 between logits. A teacher trained with weight decay
    (largest logit about 13 on real MNIST digits) cannot give it within the
    pixel range, so the inputs saturate and still miss their targets; on such a
    LeNet-5, τ 5 gave a student 10 points more than τ 20 at 2400 DIs
    (benches/results/zskd_di_study_cpu.md). The KL divergence from the
    result's ``soft_targets`` to ``softmax(teacher(x) / τ)`` says which case
    one is in: 0.7 nats there at τ 20, 0.09 at τ 5.

    Args:
        beta: a β or a sequence of them.
        classifier_weight: the (K, H) final-layer weight to take class
            similarities from (None: ``teacher.classifier.weight`` when that is
            an ``nn.Linear``, else the last ``nn.Linear`` of the teacher).
        See :class:`DeepInversion` for the other options.
    """

    method = "data-impressions"
    objective = "soft"

    #: DataImpressions' own defaults over the engine's (ENGINE_DEFAULTS).
    DEFAULTS = {"temperature": 20.0, "lr": 0.01, "iterations": 1500, "batch_size": 256, "bn_form": "sq_std",
                "flip": False, "schedule": "constant"}

    def __init__(self, teacher: nn.Module, *, input_shape: Sequence[int], mean=None, std=None,
                 beta: float | Sequence[float] = DATA_IMPRESSIONS_BETA, classifier_weight: torch.Tensor | None = None,
                 settings: InversionSettings | None = None, **kwargs) -> None:
        given = merge_settings(settings, kwargs, type(self).__name__)
        super().__init__(teacher, input_shape=input_shape, mean=mean, std=std, **{**self.DEFAULTS, **given})
        owner = type(self).__name__
        betas = (beta,) if isinstance(beta, (int, float)) else tuple(beta)
        if not betas:
            raise ValueError(f"{owner}: beta must be a number > 0 or a non-empty sequence of them")
        self.beta = tuple(check_float(b, "beta", owner, positive=True) for b in betas)
        if classifier_weight is None:
            classifier_weight = _classifier_weight(teacher, owner)
        if not isinstance(classifier_weight, torch.Tensor) or classifier_weight.dim() != 2:
            raise ValueError(f"{owner}: classifier_weight must be a (K, H) tensor; got "
                             f"{getattr(classifier_weight, 'shape', type(classifier_weight).__name__)}")
        if self._num_classes is not None and classifier_weight.shape[0] != self._num_classes:
            raise ValueError(f"{owner}: classifier_weight has {classifier_weight.shape[0]} rows but "
                             f"num_classes is {self._num_classes}")
        with torch.no_grad():
            self.similarity = class_similarity(classifier_weight.detach().float()).to(self.device)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["beta"] = list(self.beta)
        return cfg

    def _targets(self, labels, generator, offset):
        k = self.similarity.shape[0]
        if k != self.num_classes:
            raise ValueError(f"{type(self).__name__}: the classifier weight has {k} rows but the teacher "
                             f"has {self.num_classes} outputs")
        # Labels cycle through the classes, so the position within the job decides the
        # β: each class's samples alternate between the βs.
        n_cls = self._cycle
        idx = (torch.arange(labels.shape[0]) + offset) // n_cls % len(self.beta)
        beta = torch.tensor(self.beta, dtype=torch.float32)[idx].to(self.device)
        conc = beta[:, None] * self.similarity[labels]
        return dirichlet_targets(conc, generator=generator)

    def _labels(self, n, classes):
        labels, given = super()._labels(n, classes)
        self._cycle = self.num_classes if given is None else len(given)
        return labels, given

    def _agreement(self, batch: SyntheticBatch) -> float:
        """Fraction of ``batch`` whose teacher argmax is the argmax of its soft target (one forward).

        Not "teacher_acc" (argmax against the class each target was drawn for): a diffuse target (β = 1)
        often peaks at another class, which the teacher then rightly matches.
        """
        with eval_mode(self.teacher), torch.no_grad():
            pred = self.teacher(batch.x).argmax(1)
        return int((pred == batch.soft_targets.argmax(1)).sum()) / len(pred)


def _classifier_weight(teacher: nn.Module, owner: str) -> torch.Tensor:
    head = getattr(teacher, "classifier", None)
    if isinstance(head, nn.Linear):
        return head.weight
    linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{owner}: the teacher has no nn.Linear layer to take class similarities from; "
                         "pass classifier_weight=")
    return linears[-1].weight
