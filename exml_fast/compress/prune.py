"""Structured (channel) pruning without the training data: score channels on synthetic images, remove the least
important ones until a MACs budget is met, then distil the pruned network from the unpruned one.

The recipe of DeepInversion's pruning experiment (Yin et al., CVPR 2020, §4.3): the images that score the channels
and fine-tune the pruned network are synthesised from the network itself (:func:`synthetic_images`). Torch-Pruning
(Fang et al., CVPR 2023; ``pip install torch-pruning==1.6.1``) traces the network's dependency graph, so that the
channels coupled by a residual addition or a depthwise convolution are removed together. Unlike DeepInversion
(Molchanov et al.'s global ranking), every layer loses the same fraction of its channels and the scores choose
which: on a LeNet-5-BN halved on DeepInversion images, a global ranking recovered no better (94.9 % against 95.2 %)
and, unrecovered, was worse (17 % against 38 %).

``importance`` names how a channel is scored (:data:`PRUNE_IMPORTANCES`):

- ``"taylor"``: the first-order Taylor estimate of the loss change when the channel is removed (Molchanov et al.,
  CVPR 2019), ``|sum over the channel's weights of weight * gradient|``, averaged over the layers the channel
  couples (its convolution's output, the next layer's input; Torch-Pruning's ``TaylorImportance`` with
  ``multivariable=True``). The gradient is that of the mean cross-entropy of the model's logits on the images
  against its own argmax labels, taken once on the unpruned model. Not the KL divergence to the unpruned model
  that DeepInversion uses: it prunes a few filters at a time between fine-tuning rounds, where the student has
  moved from its teacher; here the scores are taken before any pruning, where the student *is* the teacher, the
  KL divergence is at its minimum and its gradient is 0.
- ``"bn_scale"``: ``|gamma|`` of the BatchNorm after the channel (Network Slimming, Liu et al., ICCV 2017), the
  baseline that needs no images.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from exml_fast._utils.checks import check_affine, check_choice, check_float, check_int
from exml_fast.compress.calibration import (BN_MATCHING_METHODS, background, check_classifier, check_images,
                                            has_batchnorm, synthetic_images)
from exml_fast.synth.base import Synthesizer, eval_mode, resolve_device
from exml_fast.training import distill

__all__ = ["PRUNE_IMPORTANCES", "PRUNE_STEPS", "PruneResult", "batchnorm_features", "logits_layer",
           "prune_without_data"]

#: the names :func:`prune_without_data` takes as ``importance`` (see the module docstring)
PRUNE_IMPORTANCES: tuple[str, ...] = ("taylor", "bn_scale")
#: the pruning schedule's resolution: step ``s`` removes ``s / PRUNE_STEPS`` of every layer's original channels
PRUNE_STEPS = 100


@dataclass
class PruneResult:
    """What :func:`prune_without_data` returns.

    MACs are Torch-Pruning's count (``tp.utils.count_ops_and_params``) for one input: the multiply-accumulates of
    the convolutions and linear layers, plus one per output element of BatchNorm, activation and pooling layers
    (as ptflops counts). FLOPs are taken as 2 x MACs, so the fraction of FLOPs removed is that of MACs.

    Attributes:
        model: the pruned (and recovered) network, in eval mode, on the original's device.
        macs_before, macs_after: MACs of one input before and after pruning.
        params_before, params_after: parameter counts before and after pruning.
        importance: the channel score used (one of :data:`PRUNE_IMPORTANCES`).
        method: where the images came from: a :data:`~exml_fast.compress.CALIBRATION_METHODS` name, the
            Synthesizer's class name, or ``"images"`` (the caller's).
        synthesis_s: seconds spent making the images (0 with ``images=``).
        recover_s: seconds spent distilling the pruned network (0 without recovery).
        channels: for every BatchNorm with running statistics, by its name in ``model``, the int64 indices of
            the original channels it kept, ascending.
    """

    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    importance: str
    method: str
    synthesis_s: float
    recover_s: float
    channels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def flops_reduction(self) -> float:
        """The fraction of the FLOPs (equivalently, of the MACs) removed: ``1 - macs_after / macs_before``."""
        return 1.0 - self.macs_after / self.macs_before


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as exc:
        raise ImportError("prune_without_data needs Torch-Pruning: pip install exml_fast[compress] "
                          "(or pip install torch-pruning==1.6.1)") from exc
    return torch_pruning


def logits_layer(model: nn.Module, example: torch.Tensor, num_classes: int, owner: str) -> nn.Module:
    """The layer that produces ``model``'s logits: the last ``nn.Linear`` or convolution run by a forward of
    ``example`` whose output has ``num_classes`` features (dim 1). Its output features are never pruned.

    Raises:
        ValueError: no such layer (the logits come out of a layer Torch-Pruning would not leave alone).
    """
    ran: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m) if o.dim() >= 2 and o.shape[1] == num_classes
                                     else None)
             for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if not ran:
        raise ValueError(f"{owner}: cannot find the layer that makes {type(model).__name__}'s {num_classes} "
                         "logits: no nn.Linear or convolution of its forward has that many output features")
    return ran[-1]


def _tracked_batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}


def _tag_channels(model: nn.Module) -> dict[str, torch.Tensor]:
    """Writes every BatchNorm's channel index into its ``running_mean`` (pruning slices the buffer with the
    channels, so afterwards it names the channels kept) and returns the true running means."""
    saved = {}
    with torch.no_grad():
        for name, bn in _tracked_batchnorms(model).items():
            saved[name] = bn.running_mean.clone()
            bn.running_mean.copy_(torch.arange(bn.running_mean.numel(), dtype=bn.running_mean.dtype))
    return saved


def batchnorm_features(pruned: nn.Module, model: nn.Module,
                       channels: dict[str, torch.Tensor]) -> list[tuple[nn.Module, nn.Module, torch.Tensor]]:
    """The ``features`` of :func:`exml_fast.training.distill` that match every BatchNorm of ``pruned`` to the
    same-named one of the unpruned ``model`` on the channels it kept (``channels``: :attr:`PruneResult.channels`).
    ``pruned`` may be a deep copy of :attr:`PruneResult.model` (the names are the same).

    Raises:
        ValueError: a BatchNorm of ``pruned`` that ``model`` or ``channels`` lacks.
    """
    originals = _tracked_batchnorms(model)
    pairs = []
    for name, bn in _tracked_batchnorms(pruned).items():
        if name not in originals or name not in channels:
            raise ValueError(f"batchnorm_features: pruned has a BatchNorm {name!r} that "
                             f"{'model' if name not in originals else 'channels'} lacks; pass the model it was "
                             "pruned from and its PruneResult.channels")
        pairs.append((bn, originals[name], channels[name]))
    return pairs


def _kept_channels(model: nn.Module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undoes :func:`_tag_channels` after pruning: the true running means of the channels kept come back, and
    their original indices are returned by BatchNorm name."""
    kept = {}
    with torch.no_grad():
        for name, bn in _tracked_batchnorms(model).items():
            idx = bn.running_mean.round().long()
            bn.running_mean.copy_(saved[name].to(bn.running_mean.device)[idx])
            kept[name] = idx.cpu()
    return kept


def _loss_gradients(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Leaves in every parameter's ``.grad`` the gradient of the mean cross-entropy of ``model`` (eval mode) on
    ``x`` against its own argmax labels (the Taylor score's gradient)."""
    model.zero_grad(set_to_none=True)
    with eval_mode(model):
        for chunk in x.split(batch_size):
            logits = model(chunk)
            (F.cross_entropy(logits, logits.argmax(1), reduction="sum") / x.shape[0]).backward()


def _prune_to(tp, pruner, model: nn.Module, example: torch.Tensor, target: float, owner: str) -> tuple[int, int]:
    """Steps ``pruner`` until the MACs are <= ``target``; returns (MACs, params) after the last step."""
    graph = pruner.DG
    for _ in range(PRUNE_STEPS):
        for group in pruner.step(interactive=True):
            dep, idxs = group[0]
            width = (graph.get_out_channels if graph.is_out_channel_pruning_fn(dep.handler)
                     else graph.get_in_channels)(dep.target.module)
            if len(idxs) < width:
                group.prune()
            elif width > 1:  # never empty a layer: local pruning lists the least important first, keep the last
                group.prune(idxs=idxs[: width - 1])
        macs, params = tp.utils.count_ops_and_params(model, example)
        if macs <= target:
            return int(macs), int(params)
    raise ValueError(f"{owner}: flops_ratio cannot be reached: with every prunable layer down to one channel "
                     f"{type(model).__name__} still has {int(macs)} MACs, more than the target {int(target)}")


def prune_without_data(model: nn.Module, input_shape: Sequence[int], mean=None, std=None, *,
                       flops_ratio: float = 0.5, importance: str = "taylor",
                       method: str | Synthesizer = "deepinversion", n: int = 256,
                       images: torch.Tensor | None = None, recover_epochs: int = 100,
                       recover_steps: int | None = None, seed: int = 0,
                       iterations: int | None = None, batch_size: int = 64, lr: float = 0.01,
                       temperature: float = 4.0, feature_weight: float = 10.0, rotate: float = 0.0,
                       scale: float = 0.0, progress: bool = True) -> PruneResult:
    """Removes ``flops_ratio`` of ``model``'s FLOPs by pruning whole channels, without its training data.

    1. Images: ``images`` if given, else ``n`` from :func:`synthetic_images` (``method``, ``mean``, ``std``,
       ``seed``, ``iterations``).
    2. Scores: every channel's ``importance`` (module docstring); for ``"taylor"`` from one gradient of the loss
       over all the images, taken once on the unpruned network (the later steps rank the channels left by the
       same gradient).
    3. Pruning, on a deep copy: Torch-Pruning's local pruning in :data:`PRUNE_STEPS` steps, step ``s`` leaving
       every prunable layer ``int((1 - s / PRUNE_STEPS) x its channels)`` (at least one) of its most important
       channels; it stops at the first step whose MACs are at most ``(1 - flops_ratio) x`` the original's. So at
       least ``flops_ratio`` is removed, and no more than one step's worth beyond: 1 % of every layer's channels
       rounded to whole channels, so more on narrow layers (LeNet-5's first layer has 6 channels: asked for 0.1,
       it loses 0.18 of its MACs; measured for 0.1 to 0.99: a slim CIFAR ResNet-18 within 0.05 of the ratio,
       MobileNetV2 within 0.01). The output features of the layer that makes the logits (:func:`logits_layer`)
       are never pruned.
    4. Recovery: ``recover_epochs`` passes of :func:`exml_fast.training.distill` of the pruned network from the
       unpruned ``model`` on the same images (KD at ``temperature``, SGD ``lr`` with cosine decay, minibatches of
       ``batch_size``, pad-and-crop augmentation padding with the background ``-mean / std``, seeded by
       ``seed``). The defaults (τ 4, lr 0.01, 100 epochs) took a LeNet-5-BN (97.2 % on MNIST) halved by Taylor
       scores on 256 DeepInversion images from 38 % to 95 % (20 epochs: 94 %; τ 20: the same; lr 0.001 or 0.05:
       worse; measured with zero padding). ``recover_steps`` sets the length in optimiser steps instead; more
       images buy little at the same steps (``benches/results/compress_prune_budget_cpu.md``: LeNet-5-BN on
       Fashion-MNIST recovers to 87.2 % after 6400 steps on 512, 4096 or 16384 images alike), so a small ``n``
       with enough steps costs the least synthesis. With ``feature_weight`` > 0 (the default) the pruned network
       also learns the unpruned one's BatchNorm outputs on the channels it kept (``distill``'s ``features``): a
       target for every channel where the logits give ten numbers per image. On validation models of Fashion-MNIST
       halved on 512 DeepInversion images (``benches/results/compress_prune_study_cpu.md``) it took the slim
       ResNet-18 from 68 % to 88.9 % (float 90.8 %), MobileNetV2 from 66 % to 79 % (84 % on DeepInversion of 1000
       steps; float 87.1 %) and LeNet-5-BN by 0.4 points on average over four DeepInversion draws. On the test
       split (``benches/results/compress_prune_cpu.md``, DeepInversion of 200 steps) the slim ResNet-18 loses 1.1
       points on Fashion-MNIST and 0.2 on MNIST, LeNet-5-BN 0.6 on MNIST but 4.5 on Fashion-MNIST (2.1 at the
       default 2000 steps, ``compress_prune_lenet_fmnist_di2000_cpu.md``, whose draws are steadier), MobileNetV2 20
       (1.5 on real images). A network that deep needs more synthesis steps (``iterations=1000``; the
       default, DeepInversion's own 2000, did no better in a probe) and ``recover_epochs=400``, with which
       MobileNetV2 loses 1.8 points (``benches/results/compress_prune_mbv2_di1000_cpu.md``). ``rotate`` and
       ``scale`` add a random rotation and zoom of every recovery image before the pad-and-crop: on the
       LeNet-5-BN Fashion-MNIST validation model, on four DeepInversion draws of 2000 steps, ``rotate=15,
       scale=0.15`` recovered 87.8 % on average against 87.4 % without (10 / 0.1 to 30 / 0.25 alike; mixup did
       not help), and its test model then loses 1.8 points (2.1 without;
       ``benches/results/compress_prune_lenet_fmnist_aug_cpu.md``). On real ``images`` the same cost it 0.6.

    Args:
        model: a trained classifier, (N, C, H, W) -> (N, K) logits with K >= 2; not modified (its parameters,
            buffers and train/eval flags are as before the call). It is the teacher of the recovery.
        input_shape: (C, H, W) of one input.
        mean, std: the input normalisation the model was trained with (see :func:`synthetic_images`).
        flops_ratio: the fraction of FLOPs to remove, in (0, 1) (0.5 halves them).
        importance: ``"taylor"`` or ``"bn_scale"``.
        method: where the images come from when ``images`` is None (see :func:`synthetic_images`).
        n: how many images to synthesise, >= 1.
        images: (N, C, H, W) float inputs to use instead of synthetic ones, normalised like the model's (real
            images: the ceiling of the synthetic ones); ``method``, ``n``, ``iterations``, ``mean`` and ``std``
            are then unused.
        recover_epochs: passes over the images of the recovery distillation, >= 0 (0: none).
        recover_steps: the recovery's optimiser steps, >= 1, in place of ``recover_epochs`` (None: use
            ``recover_epochs``).
        seed: the seed of the synthesis and of the recovery's minibatches and augmentation.
        iterations: synthesis steps per batch (None: the method's own).
        batch_size: the minibatch of the Taylor gradient and of the recovery, >= 1.
        lr: the recovery's initial SGD learning rate, > 0.
        temperature: the recovery's KD temperature, > 0.
        feature_weight: the weight of the recovery's feature term, the mean squared difference of the pruned and
            the unpruned network's BatchNorm outputs on the kept channels summed over the BatchNorms, >= 0
            (0: logits only, as the records made before it; on LeNet-5-BN 1 to 100 did alike, on MobileNetV2 100
            hurt and 1 did 0.7 points worse than 10). A model without BatchNorm has no such term.
        rotate: the recovery rotates each image by an angle drawn in ``[-rotate, rotate]`` degrees, in [0, 180]
            (0: no rotation), about its centre, filling with the background ``-mean / std``.
        scale: the recovery zooms each image by a factor drawn in ``[1 - scale, 1 + scale]``, in [0, 1) (0: no
            zoom).
        progress: show the synthesis's progress bar.

    Returns:
        A :class:`PruneResult`.

    Raises:
        ImportError: Torch-Pruning is not installed.
        TypeError: ``model`` is not an nn.Module.
        ValueError: ``model`` is not a classifier of ``input_shape`` inputs; ``flops_ratio`` is not in (0, 1); an
            unknown ``importance``; ``rotate`` not in [0, 180] or ``scale`` not in [0, 1);
            ``importance="bn_scale"``, or a BatchNorm-matching ``method`` without
            ``images``, on a model without BatchNorm; ``images`` of another shape; a model Torch-Pruning cannot
            trace; a ``flops_ratio`` not reachable with one channel left per layer.
    """
    owner = "prune_without_data"
    shape, num_classes = check_classifier(model, input_shape, owner)
    flops_ratio = check_float(flops_ratio, "flops_ratio", owner, positive=True)
    if flops_ratio >= 1:
        raise ValueError(f"{owner}: flops_ratio must be a fraction in (0, 1) of the FLOPs to remove; "
                         f"got {flops_ratio!r}")
    check_choice(importance, "importance", owner, PRUNE_IMPORTANCES)
    for name, value, low in (("n", n, 1), ("recover_epochs", recover_epochs, 0), ("seed", seed, None),
                             ("batch_size", batch_size, 1)):
        check_int(value, name, owner, low=low)
    if recover_steps is not None:
        check_int(recover_steps, "recover_steps", owner, low=1)
    lr = check_float(lr, "lr", owner, positive=True)
    temperature = check_float(temperature, "temperature", owner, positive=True)
    feature_weight = check_float(feature_weight, "feature_weight", owner)
    rotate, scale = check_affine(rotate, scale, owner, names=("rotate", "scale"))
    name = type(model).__name__
    if importance == "bn_scale" and not has_batchnorm(model):
        raise ValueError(f"{owner}: importance='bn_scale' ranks channels by the |gamma| of their BatchNorm, but "
                         f"{name} has no BatchNorm layer; use importance='taylor'")
    if images is None and isinstance(method, str) and method in BN_MATCHING_METHODS and not has_batchnorm(model):
        raise ValueError(f"{owner}: method={method!r} matches BatchNorm statistics, but {name} has no BatchNorm "
                         "layer with running statistics; use method='noise', a Synthesizer instance (e.g. "
                         "ModelInversion), or real images=")
    tp = _torch_pruning()
    device = resolve_device(model, None, owner)

    synthesis_s = 0.0
    if images is not None:
        x, source = check_images(images, shape, owner).to(device, torch.float32), "images"
    else:
        start = time.perf_counter()
        x = synthetic_images(model, shape, mean=mean, std=std, method=method, n=n, seed=seed,
                             iterations=iterations, progress=progress)
        source = method if isinstance(method, str) else type(method).__name__
        synthesis_s = time.perf_counter() - start

    pruned = copy.deepcopy(model).eval().requires_grad_(True)
    example = x[:1]
    head = logits_layer(pruned, example, num_classes, owner)
    scorer = (tp.importance.TaylorImportance(multivariable=True) if importance == "taylor"
              else tp.importance.BNScaleImportance())
    try:
        macs_before, params_before = tp.utils.count_ops_and_params(pruned, example)
        pruner = tp.pruner.MetaPruner(pruned, example, importance=scorer, pruning_ratio=1.0,
                                      iterative_steps=PRUNE_STEPS, ignored_layers=[head])
    except Exception as exc:  # whatever Torch-Pruning's tracer trips on, reported with the model's name
        raise ValueError(f"{owner}: Torch-Pruning cannot trace {name} to find its coupled channels "
                         f"({type(exc).__name__}: {exc})") from exc
    if not pruner.initial_total_channels:  # e.g. a forward under no_grad: the autograd graph links no layers
        raise ValueError(f"{owner}: Torch-Pruning finds no channel it can remove in {name}: the autograd graph of "
                         "its forward reaches no convolution or linear layer but the one that makes the logits")
    if importance == "taylor":
        _loss_gradients(pruned, x, batch_size)
    saved = _tag_channels(pruned)
    try:
        macs_after, params_after = _prune_to(tp, pruner, pruned, example, (1 - flops_ratio) * macs_before, owner)
    finally:
        channels = _kept_channels(pruned, saved)
    pruned.zero_grad(set_to_none=True)

    recover_s = 0.0
    if recover_steps is not None or recover_epochs:
        start = time.perf_counter()
        length = {"iterations": recover_steps} if recover_steps is not None else {"epochs": recover_epochs}
        if feature_weight:
            length.update(features=batchnorm_features(pruned, model, channels), feature_weight=feature_weight)
        with eval_mode(model):  # distill puts its teacher in eval mode; the caller's flags come back after
            distill(pruned, x, teacher=model, temperature=temperature, **length,
                    batch_size=batch_size, lr=lr, schedule="cosine", generator=seed, fill=background(mean, std),
                    rotate=rotate, scale=scale)
        recover_s = time.perf_counter() - start
    return PruneResult(model=pruned.eval(), macs_before=int(macs_before), macs_after=macs_after,
                       params_before=int(params_before), params_after=params_after, importance=importance,
                       method=source, synthesis_s=synthesis_s, recover_s=recover_s, channels=channels)
