"""Plain supervised training and evaluation of classifiers on in-memory tensors.

Used to train experts (teachers) for the demo, the command line and the
tests, and (:func:`distill`) to train a student only on synthetic inputs
(zero-shot knowledge distillation); data-free synthesis itself lives in
:mod:`exml_fast.synth` and the ExML engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.batches import minibatch_bounds
from exml_fast._utils.checks import check_affine, check_choice, check_float, check_int, cpu_generator

__all__ = ["KD_LOSSES", "OPTIMIZERS", "SCHEDULES", "augment_batch", "distill", "evaluate", "minibatch_bounds",
           "random_affine", "random_mixup", "train_classifier"]

#: Optimisers :func:`distill` accepts.
OPTIMIZERS = ("sgd", "adam")
#: The losses :func:`distill` can put between a student and its teacher: the KD loss at a temperature, or DFAD's
#: L1 distance of the logits.
KD_LOSSES = ("kd", "l1")
#: Learning-rate schedules :func:`distill` and :func:`train_classifier` accept.
SCHEDULES = ("constant", "cosine")


class _LossLog:
    """Prints the mean loss of the last ``every`` steps, and the step rate (every = 0: silent)."""

    def __init__(self, every: int, total: int, label: str, *, width: int) -> None:
        self.every, self.total, self.label, self.width = every, total, label, width
        self.running, self.seen, self.t0 = 0.0, 0, time.perf_counter()

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.every:
            return
        self.running += loss.item()
        self.seen += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            rate = (step + 1) / (time.perf_counter() - self.t0)
            print(f"  {self.label} {step + 1:{self.width}d}/{self.total} loss {self.running / self.seen:.4f} "
                  f"({rate:.0f} steps/s)", flush=True)
            self.running, self.seen = 0.0, 0


def augment_batch(x: torch.Tensor, generator: torch.Generator | None, *, pad_crop: int = 4, max_shift: int = 0,
                  flip: bool = False, fill: float | torch.Tensor = 0.0,
                  within: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-sample augmentation of a (B, C, H, W) minibatch (the fused ``augment`` op).

    Each sample gets its own draw, made on the CPU from ``generator``: a
    circular roll by up to ``max_shift`` pixels, a horizontal flip with
    probability 1/2 if ``flip``, then pad by ``pad_crop`` and crop back. The
    padding takes the value ``fill`` (in the space of ``x``: pass the
    normalised background, e.g. ``-mean / std``, to pad with black): a float,
    or a tensor broadcastable to ``x`` such as a (1, C, 1, 1) per-channel value.
    ``within=(lo, total)``: ``x`` is rows ``lo`` to ``lo + len(x)`` of a minibatch of ``total`` rows (one
    rank's share of a sharded step): the draws of all ``total`` rows are made, and those rows' applied, so
    ``generator`` advances as for the whole minibatch.
    """
    from exml_fast.ops import augment_with_params, draw_augment_params

    b = x.shape[0]
    lo, total = (0, b) if within is None else within
    if not 0 <= lo <= lo + b <= total:
        raise ValueError(f"augment_batch: within=(lo, total) must hold the {b} rows of x; got {within!r}")
    params = draw_augment_params(total, max_shift=max_shift, flip=flip, pad_crop=pad_crop, device="cpu",
                                 generator=generator)
    params = (params if within is None else params[lo : lo + b]).to(x.device)
    # The op pads with zeros: shift so that the padding takes the value `fill`.
    if isinstance(fill, torch.Tensor) or fill:
        return augment_with_params(x - fill, params, pad_crop=pad_crop) + fill
    return augment_with_params(x, params, pad_crop=pad_crop)


def random_affine(x: torch.Tensor, generator: torch.Generator | None, *, degrees: float = 0.0, scale: float = 0.0,
                  fill: float = 0.0) -> torch.Tensor:
    """Per-sample random rotation and zoom of a (B, C, H, W) minibatch about its centre (bilinear).

    Each sample is rotated by an angle drawn uniformly in ``[-degrees, degrees]`` and scaled by a factor drawn
    uniformly in ``[1 - scale, 1 + scale]``; the draws (two per sample) are made on the CPU from ``generator``.
    Pixels that come from outside the image take the value ``fill`` (in the space of ``x``). The Data Impressions
    paper augments its DIs with "scaling, translation, rotation" for the distillation; this is the scaling and
    rotation (translation: :func:`augment_batch`).
    """
    degrees, scale = check_affine(degrees, scale, "random_affine")
    b = x.shape[0]
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64) * 2 - 1
    angle = u[:, 0] * math.radians(degrees)
    zoom = 1 + u[:, 1] * scale
    # affine_grid maps each output pixel to where it samples the input: the inverse rotation, divided by the zoom
    cos, sin, zero = torch.cos(angle) / zoom, torch.sin(angle) / zoom, torch.zeros(b, dtype=torch.float64)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def random_mixup(x: torch.Tensor, generator: torch.Generator | None, *, alpha: float) -> torch.Tensor:
    """Mixes each sample of a (B, C, H, W) minibatch with another one of it: ``λ x_i + (1 - λ) x_π(i)``.

    ``π`` is a random permutation of the minibatch and ``λ ~ Beta(alpha, alpha)`` is drawn per sample (mixup,
    Zhang et al. 2018, on inputs only: in :func:`distill` the teacher labels the mixed input, so no target is
    mixed). The draws are made on the CPU from ``generator``: the permutation, then one seed for the Beta draws.
    A set of synthetic inputs is small beside a training set, and mixing its samples asks the teacher about
    inputs between them.
    """
    alpha = check_float(alpha, "alpha", "random_mixup", positive=True)
    b = x.shape[0]
    perm = torch.randperm(b, generator=generator)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # torch.distributions takes no generator: draw under a forked seed
        torch.manual_seed(seed)
        lam = torch.distributions.Beta(alpha, alpha).sample((b,))
    lam = lam.to(x.device, x.dtype).view(b, *([1] * (x.dim() - 1)))
    return torch.lerp(x[perm.to(x.device)], x, lam)


def _sampled(sampler: Callable[[int, torch.Generator], torch.Tensor], batch_size: int,
             gen: torch.Generator) -> torch.Tensor:
    """One step's inputs from a :func:`distill` sampler, checked to be a (batch_size, C, H, W) float batch."""
    xb = sampler(batch_size, gen)
    if not (isinstance(xb, torch.Tensor) and xb.dim() == 4 and xb.shape[0] == batch_size and xb.is_floating_point()):
        got = f"{xb.dtype} {tuple(xb.shape)}" if isinstance(xb, torch.Tensor) else type(xb).__name__
        raise ValueError(f"distill: the sampler x must return a float tensor of shape (batch_size={batch_size}, "
                         f"C, H, W); got {got}")
    return xb


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on images ``x`` (N, ...) with labels ``y`` (N,).

    Batches are moved to the model's device; returns a float in [0, 1] (0 for N = 0).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"evaluate: x and y must have the same length; got {x.shape[0]} and {y.shape[0]}")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / max(1, x.shape[0])


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    generator: torch.Generator | None = None,
    log_every: int = 0,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    schedule: str = "constant",
    optimizer: str = "sgd",
) -> nn.Module:
    """Trains ``model`` with SGD (or Adam) and cross-entropy on (N, ...) images ``x``, labels ``y`` (N,).

    The Ex-Model CL expert recipe by default (SGD lr 0.01, momentum 0.9,
    weight decay 5e-4, constant lr); ``schedule="cosine"`` decays the lr to 0 over
    the run's steps (a short run then ends on a settled model, not on wherever the
    last steps of a constant lr left it). Minibatches are drawn by a permutation from
    ``generator`` each epoch (:func:`minibatch_bounds`: a last minibatch of one
    sample is folded into the one before) and moved to the model's device. Prints the
    running loss every ``log_every`` steps (0: silent); ``callback(epoch, step,
    loss)`` (0-based; ``loss`` the minibatch's detached loss tensor, on the
    model's device) runs after every optimiser step, e.g. for a progress bar.
    ``optimizer="adam"`` trains with Adam (default betas; ``momentum`` unused) at ``lr`` with
    ``weight_decay``, as DAFL's public code trains its MNIST teacher. Returns the model in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"train_classifier: epochs must be >= 1; got {epochs}")
    if batch_size < 1:
        raise ValueError(f"train_classifier: batch_size must be >= 1; got {batch_size}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"train_classifier: x and y must have the same, non-zero length; got {x.shape[0]} and {y.shape[0]}"
        )
    check_choice(schedule, "schedule", "train_classifier", SCHEDULES)
    check_choice(optimizer, "optimizer", "train_classifier", OPTIMIZERS)
    device = next(model.parameters()).device
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    bounds = minibatch_bounds(n, batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(bounds))
             if schedule == "cosine" else None)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        log = _LossLog(log_every, len(bounds), f"epoch {epoch + 1}/{epochs} step", width=4)
        for step, (start, end) in enumerate(bounds):
            idx = perm[start:end]
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            log.add(step, loss)
            if callback is not None:
                callback(epoch, step, loss.detach())
    return model.eval()




def distill(
    student: nn.Module,
    x: torch.Tensor | Callable[[int, torch.Generator], torch.Tensor],
    *,
    teacher: nn.Module | None = None,
    soft_targets: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 20.0,
    loss: str = "kd",
    epochs: int | None = None,
    iterations: int | None = None,
    batch_size: int = 64,
    lr: float = 0.01,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "constant",
    warmup: int = 0,
    augment: bool = True,
    pad_crop: int = 4,
    max_shift: int = 0,
    flip: bool = False,
    rotate: float = 0.0,
    scale: float = 0.0,
    fill: float = 0.0,
    mixup: float = 0.0,
    features: Sequence[tuple[nn.Module, nn.Module, torch.Tensor | None]] | None = None,
    feature_weight: float = 1.0,
    generator: torch.Generator | int | None = None,
    log_every: int = 0,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Trains ``student`` only on (synthetic) inputs ``x`` — zero-shot knowledge distillation.

    The target of a minibatch comes from exactly one of:

    - ``teacher``: the KD loss :func:`exml_fast.ops.kd_loss` at ``temperature``
      between the student's and the frozen teacher's logits on the same
      (augmented) minibatch, ``τ² KL(softmax(t/τ) || softmax(s/τ))``. This is
      the Data Impressions paper's zero-shot KD (τ = 20 there).
    - ``soft_targets`` (N, K): the soft-target cross-entropy
      :func:`exml_fast.ops.soft_target_cross_entropy` of the student's logits
      at ``temperature`` (e.g. a :class:`~exml_fast.synth.SyntheticBatch`'s
      Dirichlet targets).
    - ``labels`` (N,) int64: plain cross-entropy (``temperature`` unused).

    ``x`` is a fixed set of inputs, or a *sampler*: a callable
    ``x(batch_size, generator)`` that returns ``batch_size`` fresh inputs for
    every step (e.g. :meth:`GenerativeSynthesizer.sample
    <exml_fast.synth.GenerativeSynthesizer.sample>`, as DAFL and DFAD train
    their students on new generator samples at every step). A sampler's
    targets come from ``teacher`` and its length from ``iterations``.

    Minibatches of a fixed ``x`` are drawn without replacement by a permutation per pass over
    ``x`` (the last minibatch of a pass may be smaller, but is never a single
    sample: :func:`minibatch_bounds`); ``iterations`` steps
    run as many passes as needed, the last one cut short. With ``augment``
    every sample of a minibatch gets its own draw (:func:`exml_fast.ops.augment`'s
    op): a circular roll by up to ``max_shift`` pixels, a horizontal flip with
    probability 1/2 if ``flip`` (leave it off for digits), then pad by
    ``pad_crop`` pixels and crop back (the ExML MNIST setting is pad-crop 4).
    The padding takes the value ``fill`` — in the space of ``x``, so for
    normalised images pass the background ``-mean / std`` to pad with black.
    All draws (permutations, augmentation) are made on the CPU from
    ``generator``, then moved to the student's device, so a seed gives the
    same run on any device up to floating-point differences.

    Args:
        student: the model to train, (B, C, H, W) → (B, K) logits; trained in
            place on its own device and returned in eval mode.
        x: (N, C, H, W) float inputs in the space the teacher expects (e.g.
            ``SyntheticBatch.x``); on any device, minibatches are moved. Or a
            sampler ``x(batch_size, generator) -> (batch_size, C, H, W)``
            called once a step with this run's CPU generator (above).
        teacher: frozen model whose logits are the targets (put in eval mode,
            its parameters untouched; run under ``torch.no_grad``).
        soft_targets: (N, K) float probabilities.
        labels: (N,) int64 class indices.
        temperature: τ > 0 of the KD / soft-target loss.
        loss: with ``teacher``, one of :data:`KD_LOSSES`: "kd" (above) or "l1",
            the mean absolute difference of the student's and the teacher's
            logits (DFAD's student loss; ``temperature`` unused).
        epochs, iterations: the length of training, exactly one of them (ints >= 1):
            passes over ``x`` or optimiser steps.
        batch_size: minibatch size (>= 1).
        lr: initial learning rate (> 0).
        optimizer: one of :data:`OPTIMIZERS`: "sgd" (with ``momentum``) or
            "adam"; both with ``weight_decay`` (L2, added to the gradient).
        schedule: one of :data:`SCHEDULES`: "constant", or "cosine" decay to 0
            over the run.
        warmup: the first this many steps scale the scheduled lr by
            ``(step + 1) / warmup`` (a linear warm-up; 0: none). A ReLU student
            distilled on synthetic inputs can die in its first steps at full lr
            (benches/results/zskd_di_study_cpu.md); a warm-up prevents it.
        augment, pad_crop, max_shift, flip, fill: the augmentation (above);
            ``pad_crop`` and ``max_shift`` are ints >= 0.
        rotate, scale: with ``augment``, first rotate each sample by up to
            ``rotate`` degrees and zoom it by a factor in ``[1 - scale, 1 + scale]``
            (:func:`random_affine`; 0 and 0: not at all, and no draws made).
        mixup: with ``teacher``, after the augmentation mix every sample with
            another of its minibatch by a weight drawn from Beta(``mixup``,
            ``mixup``) (:func:`random_mixup`), and distil the teacher's logits
            on the mixed inputs; 0: off, and no draws made. Not with
            ``soft_targets`` or ``labels``, whose targets belong to unmixed
            inputs.
        features: with ``teacher``, pairs of layers whose outputs are matched
            beside the logits (hints, as FitNets; here without a regressor):
            ``(student_layer, teacher_layer, channels)`` adds
            ``feature_weight x`` the mean squared difference of the student
            layer's output and the teacher layer's output on the same
            minibatch, restricted to the int64 ``channels`` of its dim 1 (None:
            all). For a pruned network and its unpruned original the channels
            are those pruning kept (:func:`exml_fast.compress.prune_without_data`
            does this). Outputs are read by forward hooks, removed on return.
        feature_weight: the weight of the summed feature terms, > 0.
        generator: None (torch's default CPU generator), an int seed or a CPU
            ``torch.Generator``.
        log_every: print the running loss every this many steps (0: silent).
        on_epoch: called as ``on_epoch(epoch, student)`` after each complete pass
            over a fixed ``x`` (``epoch`` counts from 1; a pass that ``iterations``
            cuts short is not complete), with the student in eval mode and under
            ``torch.no_grad``, e.g. to score it on held-out images each epoch. The
            run's draws come from ``generator`` alone, so a callback that does not
            change the student leaves the run as it is. Not with a sampler ``x``,
            which has no passes.

    Returns:
        ``student``, in eval mode.

    Raises:
        ValueError: no target source or more than one; neither or both of
            ``epochs`` / ``iterations``; shapes that do not match; a sampler
            without ``teacher`` or with ``epochs``, or one whose batch is not
            (batch_size, C, H, W) float; an unknown
            ``optimizer`` or ``schedule``; a non-positive size, lr or temperature;
            ``rotate`` not in [0, 180] or ``scale`` not in [0, 1) (checked
            with or without ``augment``); ``on_epoch`` not callable, or with a
            sampler; ``mixup`` negative, or set without ``teacher``; ``features``
            without ``teacher``, not (module, module, channels) triples, or
            whose outputs' shapes do not match (raised at the first step).
    """
    from exml_fast.ops import kd_loss, soft_target_cross_entropy

    sources = [name for name, v in (("teacher", teacher), ("soft_targets", soft_targets), ("labels", labels))
               if v is not None]
    if len(sources) != 1:
        raise ValueError(f"distill: pass exactly one of teacher, soft_targets or labels; got "
                         f"{', '.join(sources) if sources else 'none'}")
    sampler = x if callable(x) and not isinstance(x, torch.Tensor) else None
    if sampler is not None:
        if teacher is None:
            raise ValueError(f"distill: a sampler x (fresh inputs every step) takes its targets from teacher; got "
                             f"{sources[0]}, which belongs to a fixed x")
        if iterations is None:
            raise ValueError("distill: a sampler x has no passes to count: pass iterations, not epochs")
        if on_epoch is not None:
            raise ValueError("distill: on_epoch is called after each pass over a fixed x; a sampler x has no passes")
    elif not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"distill: x must be a float tensor of shape (N, C, H, W) or a sampler "
                         f"x(batch_size, generator); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    n = batch_size if sampler is not None else x.shape[0]
    if n == 0:
        raise ValueError("distill: x must hold at least one sample; got N = 0")
    if soft_targets is not None and (soft_targets.dim() != 2 or soft_targets.shape[0] != n):
        raise ValueError(f"distill: soft_targets must have shape (N, K) with N = {n}; got "
                         f"{tuple(soft_targets.shape)}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != n or labels.dtype != torch.int64):
        raise ValueError(f"distill: labels must be an int64 tensor of shape (N,) = ({n},); got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if (epochs is None) == (iterations is None):
        raise ValueError(f"distill: pass exactly one of epochs or iterations; got epochs={epochs!r}, "
                         f"iterations={iterations!r}")
    if epochs is not None:
        check_int(epochs, "epochs", "distill", low=1)
    else:
        check_int(iterations, "iterations", "distill", low=1)
    check_int(batch_size, "batch_size", "distill", low=1)
    check_choice(optimizer, "optimizer", "distill", OPTIMIZERS)
    check_choice(loss, "loss", "distill", KD_LOSSES)
    if loss != "kd" and teacher is None:
        raise ValueError(f"distill: loss={loss!r} compares the student's logits with a teacher's; with "
                         f"{sources[0]} the loss is fixed (leave loss='kd')")
    check_choice(schedule, "schedule", "distill", SCHEDULES)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"distill: lr must be a finite number > 0; got {lr!r}")
    if labels is None and not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                               and temperature > 0):
        raise ValueError(f"distill: temperature must be a finite number > 0; got {temperature!r}")
    for name, value in (("pad_crop", pad_crop), ("max_shift", max_shift)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"distill: {name} must be an int >= 0; got {value!r}")
    if not isinstance(log_every, int) or log_every < 0:
        raise ValueError(f"distill: log_every must be an int >= 0; got {log_every!r}")
    if on_epoch is not None and not callable(on_epoch):
        raise ValueError(f"distill: on_epoch must be a callable on_epoch(epoch, student) or None; got "
                         f"{type(on_epoch).__name__}")
    check_int(warmup, "warmup", "distill", low=0)
    mixup = check_float(mixup, "mixup", "distill")
    if mixup and teacher is None:
        raise ValueError(f"distill: mixup={mixup!r} needs teacher to label the mixed inputs; the targets of "
                         f"{sources[0]} belong to unmixed inputs")
    pairs = _check_features(features, teacher, sources[0])
    if pairs:
        feature_weight = check_float(feature_weight, "feature_weight", "distill", positive=True)
    gen = cpu_generator(generator, "distill")

    device = next(student.parameters()).device
    pairs = [(s_layer, t_layer, None if ch is None else ch.to(device), span) for s_layer, t_layer, ch, span in pairs]
    bounds = minibatch_bounds(n, batch_size)
    total = iterations if iterations is not None else epochs * len(bounds)
    params = student.parameters()
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if warmup:
        def factor(step: int) -> float:
            decay = 0.5 * (1.0 + math.cos(math.pi * step / total)) if schedule == "cosine" else 1.0
            return min(1.0, (step + 1) / warmup) * decay

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    else:  # without a warm-up, the scheduler the records before it was added were made with
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if schedule == "cosine" else None
    if teacher is not None:
        teacher.eval()
    do_augment = augment and (pad_crop > 0 or max_shift > 0 or flip)
    rotate, scale = check_affine(rotate, scale, "distill", names=("rotate", "scale"))  # before any step
    do_affine = augment and (rotate or scale)

    student.train()
    log = _LossLog(log_every, total, "distill step", width=5)
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    hooks = [layer.register_forward_hook(_keep_output(outputs, (side, i)))
             for i, pair in enumerate(pairs) for side, layer in (("s", pair[0]), ("t", pair[1]))]
    try:
        perm = torch.empty(0, dtype=torch.int64)
        pos = len(bounds)
        for step in range(total):
            if sampler is not None:
                xb = _sampled(sampler, batch_size, gen).to(device)
            else:
                if pos == len(bounds):
                    perm, pos = torch.randperm(n, generator=gen), 0
                idx = perm[bounds[pos][0] : bounds[pos][1]]
                pos += 1
                xb = x[idx].to(device)
            if do_affine:
                xb = random_affine(xb, gen, degrees=rotate, scale=scale, fill=fill)
            if do_augment:
                xb = augment_batch(xb, gen, pad_crop=pad_crop, max_shift=max_shift, flip=flip, fill=fill)
            if mixup:
                xb = random_mixup(xb, gen, alpha=mixup)
            logits = student(xb)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(xb).to(logits.dtype)
                value = (kd_loss(logits, t_logits, temperature=float(temperature)) if loss == "kd"
                         else F.l1_loss(logits, t_logits))
                if pairs:
                    value = value + feature_weight * _feature_loss(pairs, outputs)
            elif soft_targets is not None:
                value = soft_target_cross_entropy(logits, soft_targets[idx].to(device, logits.dtype),
                                                  temperature=float(temperature))
            else:
                value = F.cross_entropy(logits, labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if sched is not None:
                sched.step()
            log.add(step, value)
            if on_epoch is not None and pos == len(bounds):  # a pass over x is complete
                student.eval()
                with torch.no_grad():
                    on_epoch((step + 1) // len(bounds), student)
                outputs.clear()  # what the feature hooks kept of the callback's forwards
                student.train()
    finally:
        for h in hooks:
            h.remove()
    return student.eval()


def _keep_output(store: dict, key: tuple[str, int]):
    def hook(module, inputs, output):
        store[key] = output
    return hook


def _check_features(features, teacher, source: str) -> list[tuple]:
    """``distill``'s ``features`` as a list of (student layer, teacher layer, channels or None, the channels'
    (min, max) or None), the range taken once here and checked against the teacher's output at each step."""
    if features is None:
        return []
    if teacher is None:
        raise ValueError(f"distill: features match the student's layers to a teacher's; with {source} there is no "
                         "teacher (pass teacher=)")
    pairs = []
    for i, pair in enumerate(features):
        ok = isinstance(pair, (tuple, list)) and len(pair) == 3 and all(isinstance(m, nn.Module) for m in pair[:2])
        channels = pair[2] if ok else None
        if ok and channels is not None:
            ok = isinstance(channels, torch.Tensor) and channels.dim() == 1 and channels.dtype == torch.int64
        if not ok:
            raise ValueError(f"distill: features[{i}] must be a (student_layer, teacher_layer, channels) triple "
                             f"of two nn.Modules and a 1-D int64 tensor or None; got {pair!r}")
        span = (int(channels.min()), int(channels.max())) if channels is not None and channels.numel() else None
        pairs.append((pair[0], pair[1], channels, span))
    return pairs


def _feature_loss(pairs, outputs: dict) -> torch.Tensor:
    """The sum over ``pairs`` of the mean squared difference of the student's and the teacher's (channels of
    the) layer outputs kept by the hooks at this step."""
    total = None
    for i, (s_layer, t_layer, channels, span) in enumerate(pairs):
        if ("s", i) not in outputs or ("t", i) not in outputs:
            side, layer = ("student", s_layer) if ("s", i) not in outputs else ("teacher", t_layer)
            raise ValueError(f"distill: features[{i}]: the {side} layer ({type(layer).__name__}) did not run in "
                             f"the {side}'s forward")
        s_out, t_out = outputs.pop(("s", i)), outputs.pop(("t", i))
        if channels is not None:
            if span is not None and (span[0] < 0 or span[1] >= t_out.shape[1]):
                raise ValueError(f"distill: features[{i}]: channels must index dim 1 of the teacher layer's output "
                                 f"({t_out.shape[1]} channels); got values in [{span[0]}, {span[1]}]")
            t_out = t_out.index_select(1, channels)
        if s_out.shape != t_out.shape:
            raise ValueError(f"distill: features[{i}]: the student layer's output {tuple(s_out.shape)} does not "
                             f"match the teacher layer's {tuple(t_out.shape)}"
                             + (" at the channels given" if channels is not None else ""))
        term = F.mse_loss(s_out, t_out.to(s_out.dtype))
        total = term if total is None else total + term
    return total
