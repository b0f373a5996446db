"""Ex-Model Distillation (the ExML paper's Algorithm 1) and its command-line variants mi-ed, di-ed, aux-ed,
replay-ed."""

from __future__ import annotations

import inspect
import time
import warnings
from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast._utils.dist import is_sharded
from exml_fast._utils.progress import Progress, RunningLoss
from exml_fast.ops.fast_layers import fast_layers
from exml_fast.cl.buffer import SyntheticBuffer
from exml_fast.cl.heads import task_head_mask
from exml_fast.cl.parallel import ShardedSteps
from exml_fast.cl.strategies.base import Strategy, check_float, check_int, derive_seed, expert_name, frozen_copy
from exml_fast.cl.strategies.registry import BuildContext, build_learner, register_strategy
from exml_fast.cl.strategies.sources import RealReplay, SynthesizerSource, as_source
from exml_fast.data import DATASETS, auxiliary_inputs
from exml_fast.synth import AuxiliaryData, DataImpressions, ModelInversion
from exml_fast.synth.base import Synthesizer
from exml_fast.training import augment_batch

__all__ = ["ExModelDistillation"]


_ED_NAMES = {"model-inversion": "mi-ed", "data-impressions": "di-ed", "auxiliary": "aux-ed",
             "real-replay": "replay-ed", "deepinversion": "deepinversion-ed"}


class ExModelDistillation(Strategy):
    """Ex-Model Distillation (ED, the ExML paper's Algorithm 1).

    For the i-th expert (i from 1):

    1. ``source`` makes ``buffer_size // i`` samples of the expert's classes;
    2. the buffer keeps a class-balanced subsample of its old content so that
       old plus new fit ``buffer_size`` (:class:`~exml_fast.cl.buffer.SyntheticBuffer`);
    3. for ``iterations`` SGD steps on minibatches of ``batch_size`` drawn from
       the buffer (augmented per sample), ``model`` minimises
       ``L_ED = ||f(x) − ỹ||² + λ_CE · CE(f(x), y)`` (:func:`exml_fast.ops.ed_loss`),
       where the target ``ỹ`` combines the normalised logits of the expert on
       its classes and of a frozen copy of ``model`` taken before the
       experience on the classes seen before (``target_mode``, ``normalize``).

    Multi-task streams (experts with task labels): each sample's target and
    loss are restricted to its task's head.

    Args:
        model: the learner, (B, C, H, W) → (B, num_classes) logits; trained in
            place (on its own device unless ``device`` is given) and available as
            ``strategy.model``.
        source: where samples come from: a synthesizer class
            (:class:`~exml_fast.synth.ModelInversion`,
            :class:`~exml_fast.synth.DataImpressions`,
            :class:`~exml_fast.synth.AuxiliaryData` (pass ``data=`` in
            ``source_options``), :class:`~exml_fast.synth.DeepInversion`),
            a :class:`SynthesizerSource`, or :class:`RealReplay` (Replay ED).
        source_options: keyword arguments for the synthesizer class.
        generator, generator_options: deprecated names of ``source`` and ``source_options`` (one release;
            ``generator`` means a ``torch.Generator`` everywhere else).
        buffer_size: N, the buffer capacity (the paper: 5000).
        iterations: distillation steps per experience (MNIST: 30000).
        lr, momentum, weight_decay: SGD (a fresh optimiser per experience); momentum 0
            by default, as in the paper's reference code (plain SGD).
        batch_size: distillation minibatch (32).
        temperature: τ of the synthesizer's loss (MI cross-entropy, DI soft
            targets) when it is built from a class and the options do not set
            one; None: the synthesizer's default. The ED loss has none (Eq. 9-10).
        lambda_ce, target_mode, normalize: of :func:`exml_fast.ops.ed_loss`
            ("slice" — the reference code — or "per_sample" — the paper, Eq. 8;
            "none", "center", "standardize").
        augment, pad_crop, max_shift, flip: per-sample augmentation of each
            minibatch (MNIST: pad-crop 4); padding takes the normalised black
            of the expert's ``mean``/``std`` when known (else 0).
        seed: every draw of experience i (synthesis, buffer subsampling,
            minibatches, augmentation) is seeded from (seed, i), so a run
            resumed after experience i equals an uninterrupted one.
        device: where the learner, experts and synthesis run (None: the
            model's device).
        progress: tqdm bars for synthesis and distillation.
    """

    #: "mi-ed", "di-ed", "aux-ed", "replay-ed" (set from the source's method)
    name = "ed"

    @property
    def ex_model(self) -> bool:
        """Whether this run respects the ExML constraints: False with real data of the experiences
        (:class:`RealReplay`, the paper's Replay ED, an upper bound), True with synthesizers or auxiliary
        data. A data source says so by its ``ex_model`` attribute (True when it has none)."""
        return bool(getattr(self.source, "ex_model", True))

    @property
    def keeps_data(self) -> bool:
        """Whether real data of past experiences is kept: with :class:`RealReplay` (the buffer holds it)."""
        return not self.ex_model

    def __init__(
        self,
        model: nn.Module,
        *,
        source=None,
        source_options: dict[str, Any] | None = None,
        buffer_size: int = 5000,
        iterations: int = 30000,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        temperature: float | None = None,
        lambda_ce: float = 1.0,
        target_mode: str = "slice",
        normalize: str = "center",
        augment: bool = True,
        pad_crop: int = 4,
        max_shift: int = 0,
        flip: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = True,
        generator=None,
        generator_options: dict[str, Any] | None = None,
    ) -> None:
        from exml_fast.reference.ed_loss import NORMALIZE_MODES, TARGET_MODES

        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module; got {type(model).__name__}")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else "cpu"
        super().__init__(device=device, seed=seed, progress=progress)
        if generator is not None or generator_options is not None:
            if source is not None or source_options is not None:
                raise TypeError(f"{owner}: pass source= (and source_options=), not also the deprecated generator=")
            warnings.warn(f"{owner}: generator= / generator_options= are renamed source= / source_options= "
                          "(generator means a torch.Generator); the old names go in the next release",
                          DeprecationWarning, stacklevel=2)
            source, source_options = generator, generator_options
        if source is None:
            raise TypeError(f"{owner}: source is required: a Synthesizer class (ModelInversion, DataImpressions, "
                            "AuxiliaryData, DeepInversion), a SynthesizerSource or RealReplay")
        if temperature is not None:
            temperature = check_float(temperature, "temperature", owner, positive=True)
            if isinstance(source, type) and issubclass(source, Synthesizer) and not issubclass(source, AuxiliaryData):
                source_options = {"temperature": temperature, **(source_options or {})}
        self.source = as_source(source, source_options, owner)
        method = self.source.describe().get("method")
        self.name = _ED_NAMES.get(method, f"{method}-ed")
        self.model = model.to(self.device)
        self.buffer = SyntheticBuffer(check_int(buffer_size, "buffer_size", owner, low=1))
        self.iterations = check_int(iterations, "iterations", owner, low=1)
        self.lr = check_float(lr, "lr", owner, positive=True)
        self.momentum = check_float(momentum, "momentum", owner)
        self.weight_decay = check_float(weight_decay, "weight_decay", owner)
        self.batch_size = check_int(batch_size, "batch_size", owner, low=1)
        self.temperature = temperature
        self.lambda_ce = check_float(lambda_ce, "lambda_ce", owner)
        check_choice(target_mode, "target_mode", owner, TARGET_MODES)
        check_choice(normalize, "normalize", owner, NORMALIZE_MODES)
        self.target_mode, self.normalize = target_mode, normalize
        self.augment = bool(augment)
        self.pad_crop = check_int(pad_crop, "pad_crop", owner, low=0)
        self.max_shift = check_int(max_shift, "max_shift", owner, low=0)
        self.flip = bool(flip)

    @property
    def generator(self):
        """Deprecated name of :attr:`source` (one release)."""
        warnings.warn("ExModelDistillation.generator is renamed .source", DeprecationWarning, stacklevel=2)
        return self.source

    def config(self) -> dict[str, Any]:
        return {**super().config(), "source": self.source.describe(), "buffer_size": self.buffer.capacity,
                "iterations": self.iterations, "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size, "temperature": self.temperature,
                "lambda_ce": self.lambda_ce, "target_mode": self.target_mode, "normalize": self.normalize,
                "augment": self.augment, "pad_crop": self.pad_crop, "max_shift": self.max_shift, "flip": self.flip}

    def train(self, expert) -> None:
        """One experience: synthesise ``N/i`` samples from ``expert``, update the buffer, distil."""
        self._check_expert(expert)
        i = self.experiences_seen + 1
        dev = self._device()
        expert_model = expert.model.to(dev).eval()

        t0 = time.perf_counter()
        extra = {}
        takes = inspect.signature(self.source.generate).parameters
        if i > 1 and "learner" in takes:
            extra["learner"] = self.model
        if "distributed" in takes:  # under torchrun: each rank synthesises its share of the batches
            extra["distributed"] = is_sharded(self.distributed)
        batch = self.source.generate(expert, self.buffer.quota(i), seed=derive_seed(self.seed, "generate", i),
                                        device=dev, progress=self.progress, **extra)
        t_gen = time.perf_counter() - t0
        outside = set(torch.unique(batch.y).tolist()) - set(expert.classes)
        if outside:
            raise ValueError(f"{type(self).__name__}.train: the source ({self.source.describe().get('method')}) "
                             f"labelled samples with classes {sorted(outside)} outside expert "
                             f"{expert_name(expert)}'s classes")
        soft = None if batch.soft_targets is None else batch.soft_targets.detach().float().cpu()
        self.buffer.update(batch.x.detach().float().cpu(), batch.y.cpu(), experience=i - 1, soft_targets=soft,
                           generator=torch.Generator().manual_seed(derive_seed(self.seed, "buffer", i)))
        gen_stats = {k: float(v.float().mean()) for k, v in batch.losses.items() if v.numel()}
        del batch, soft

        loss, t_distill = self._distill_from(expert_model, expert, i)
        del expert_model
        self._record(expert, generated=self.buffer.quota(i), buffer=len(self.buffer), final_loss=loss,
                     generate_s=round(t_gen, 3), distill_s=round(t_distill, 3), source_stats=gen_stats)

    def _distill_from(self, expert_model: nn.Module, expert, i: int) -> tuple[float, float]:
        """Distils ``expert_model`` and (from the second experience) a frozen copy of the learner taken now;
        returns the last loss and the seconds it took."""
        prev = frozen_copy(self.model) if i > 1 else None
        t0 = time.perf_counter()
        loss = self._distill(expert_model, expert, prev, i)
        return loss, time.perf_counter() - t0

    def _fill(self, expert) -> float | torch.Tensor:
        if expert.mean is None or expert.std is None:
            return 0.0
        m = torch.tensor(expert.mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(expert.std, dtype=torch.float32).view(1, -1, 1, 1)
        return ((0.0 - m) / s).to(self._device())

    def _distill(self, expert_model: nn.Module, expert, prev: nn.Module | None, i: int) -> float:
        from exml_fast.ops import ed_loss

        dev = self._device()
        prev_classes = self.classes_seen
        expert_classes = torch.tensor(sorted(expert.classes), dtype=torch.int64, device=dev)
        prev_t = torch.tensor(prev_classes, dtype=torch.int64, device=dev) if prev is not None else None
        heads = task_of = None
        if expert.task_id is not None:
            tasks = self.experience_tasks + [expert.task_id]
            heads = task_head_mask(self.experience_classes + [tuple(expert.classes)], tasks,
                                   self.num_classes).to(dev)
            task_of = torch.tensor(tasks, dtype=torch.int64)
        fill = self._fill(expert)

        gen = torch.Generator().manual_seed(derive_seed(self.seed, "distill", i))
        # Under torchrun: DDP over the ranks, each on its share of every minibatch (exml_fast.cl.parallel).
        steps = ShardedSteps(self)
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        # Buffer labels come from the sources (the expert's classes) or from earlier experiences, so
        # ed_loss's per-step label check (a host sync on CUDA) is skipped.
        bar = Progress(self.iterations, f"distil {i}", self.progress and steps.rank == 0)
        running = RunningLoss(bar, self.iterations, dev, reduce=steps.mean_over_ranks if steps.sharded else None)
        self.model.train()
        # The three models' stride = kernel pooling and tanh layers (LeNet's) take exml_fast.ops.window_pool
        # and exml_fast.ops.tanh on the CPU.
        with fast_layers(self.model, expert_model, prev):
            try:
                for _ in range(self.iterations):
                    lo, hi, scale = steps.rows(self.batch_size)
                    xb, yb, exp_b = self._minibatch(gen, expert_model, expert_classes, rows=(lo, hi))
                    if self.augment and (self.pad_crop or self.max_shift or self.flip):
                        xb = augment_batch(xb, gen, pad_crop=self.pad_crop, max_shift=self.max_shift, flip=self.flip,
                                           fill=fill, within=(lo, self.batch_size) if steps.sharded else None)
                    with torch.no_grad():
                        e_logits = expert_model(xb)
                        p_logits = prev(xb) if prev is not None else None
                    logits = steps.forward(xb)
                    loss = ed_loss(logits, yb, expert_logits=e_logits, expert_classes=expert_classes,
                                   prev_logits=p_logits, prev_classes=prev_t, target_mode=self.target_mode,
                                   normalize=self.normalize, lambda_ce=self.lambda_ce,
                                   task_ids=None if task_of is None else task_of[exp_b].to(dev),
                                   task_heads=heads, check_labels=False)
                    loss = steps.scaled(loss, scale)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    running.add(loss)
                running.flush()
            finally:
                bar.close()
                steps.finish()
                self.model.eval()
        return running.last

    def _minibatch(self, gen: torch.Generator, expert_model: nn.Module, expert_classes: torch.Tensor, *,
                   rows: tuple[int, int] | None = None):
        """One distillation minibatch before augmentation: inputs and labels on the device, and the experience
        index of each sample (CPU); here drawn from the buffer. ``rows=(lo, hi)``: only those rows of the
        minibatch (a rank's share), the draws made as for all of it."""
        dev = self._device()
        idx = self.buffer.sample(self.batch_size, generator=gen)
        if rows is not None:
            idx = idx[rows[0] : rows[1]]
        return (self.buffer.x[idx].to(dev, non_blocking=True), self.buffer.y[idx].to(dev, non_blocking=True),
                self.buffer.experience[idx])

    @torch.no_grad()
    def logits(self, x, task_ids):
        self.model.eval()
        return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "model": self.model.state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.model.load_state_dict(state["model"])
        self.buffer.load_state_dict(state["buffer"])


# -- the command-line variants -------------------------------------------------------------------------


def _synth_options(opt: dict[str, Any]) -> dict[str, Any]:
    """The synthesizer options shared by mi-ed and di-ed, from run options."""
    common = dict(iterations=opt["synth_iterations"], batch_size=opt["synth_batch_size"], lr=opt["synth_lr"],
                  bn_weight=opt["bn_weight"], first_bn_multiplier=opt["first_bn_multiplier"], bn_form=opt["bn_form"],
                  blur_weight=opt["blur_weight"], l2_sq_weight=opt["l2_sq_weight"])
    if opt["competition_weight"]:
        # Adaptive DeepInversion: the source swaps "learner" for the learner once it has seen an expert.
        common.update(competitor="learner", competition_weight=opt["competition_weight"])
    return common


def _ed(ctx: BuildContext, opt: dict[str, Any], source) -> ExModelDistillation:
    return ExModelDistillation(
        build_learner(ctx.stream, ctx.seed, model=ctx.model), source=source, buffer_size=opt["buffer_size"],
        iterations=opt["iterations"], lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"],
        batch_size=opt["batch_size"], lambda_ce=opt["lambda_ce"], target_mode=opt["target_mode"],
        normalize=opt["normalize"], augment=opt["augment"], flip=opt["flip"], seed=ctx.seed, device=ctx.device,
        progress=ctx.progress)


@register_strategy("mi-ed", keeps_data=False, help="Ex-Model Distillation from model inversion of each expert")
def _mi_ed(ctx: BuildContext, opt: dict[str, Any]) -> ExModelDistillation:
    return _ed(ctx, opt, SynthesizerSource(ModelInversion, **_synth_options(opt),
                                           temperature=opt["temperature"] or 2.0))


@register_strategy("di-ed", keeps_data=False, help="Ex-Model Distillation from Data Impressions of each expert")
def _di_ed(ctx: BuildContext, opt: dict[str, Any]) -> ExModelDistillation:
    beta = tuple(opt["beta"]) if isinstance(opt["beta"], (tuple, list)) else (opt["beta"],)
    return _ed(ctx, opt, SynthesizerSource(DataImpressions, **_synth_options(opt),
                                           beta=beta[0] if len(beta) == 1 else beta,
                                           temperature=opt["temperature"] or 20.0))


@register_strategy("aux-ed", keeps_data=False,
                   help="Ex-Model Distillation from another dataset's images, labelled by each expert")
def _aux_ed(ctx: BuildContext, opt: dict[str, Any]) -> ExModelDistillation:
    own = ctx.scenario.dataset
    if own not in DATASETS and opt["aux_dataset"] is None:
        raise ValueError(f"aux-ed: the paper's auxiliary data for {own} is ImageNet, which exml_fast cannot "
                         f"load; pass --aux-dataset (one of {', '.join(DATASETS)})")
    aux = opt["aux_dataset"] or next((d for d in DATASETS if d != own), None)
    if aux is None or aux not in DATASETS or aux == own:
        raise ValueError(f"aux-ed: --aux-dataset must be one of {', '.join(DATASETS)} other than the "
                         f"scenario's {own!r}; got {aux!r}")
    sc = ctx.scenario
    data = auxiliary_inputs(aux, input_shape=sc.input_shape, mean=sc.mean, std=sc.std, root=ctx.data_root)
    return _ed(ctx, opt, SynthesizerSource(AuxiliaryData, data=data, batch_size=opt["synth_batch_size"]))


@register_strategy("replay-ed", keeps_data=True,
                   help="Ex-Model Distillation from real training data (breaks ExML: the upper bound)")
def _replay_ed(ctx: BuildContext, opt: dict[str, Any]) -> ExModelDistillation:
    return _ed(ctx, opt, RealReplay(ctx.scenario))
