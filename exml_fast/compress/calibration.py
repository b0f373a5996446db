"""Inputs for compressing a model without its data: synthetic images, ZeroQ's distilled data, or noise.

:func:`synthetic_images` is the one place :mod:`exml_fast.compress` gets the images it calibrates, scores
channels and distils on. Its ``method`` names where they come from:

- ``"deepinversion"``: :class:`~exml_fast.synth.DeepInversion` with its ``auto`` preset (class-balanced: the
  labels cycle through the model's classes), the images that work on the user's model without tuning;
- ``"zeroq"``: ZeroQ's distilled data (Cai et al., CVPR 2020, §3.1): a Gaussian batch moved by Adam (lr 0.5)
  until the statistics of every BatchNorm layer's input match the layer's running ones, with no class target;
- ``"data-impressions"`` and ``"model-inversion"``: :class:`~exml_fast.synth.DataImpressions` (Dirichlet
  soft targets from the classifier's weights; no BatchNorm needed) and :class:`~exml_fast.synth.ModelInversion`
  (image priors, and the BN term where the model has BN), with their defaults;
- ``"noise"``: Gaussian noise in the model's input space (standard normal after normalisation), the floor;
- a :class:`~exml_fast.synth.Synthesizer` instance (a trained :class:`~exml_fast.synth.GenerativeSynthesizer`
  such as DAFL's or DFAD's generator, :class:`~exml_fast.synth.DataImpressions`, a configured DeepInversion):
  its ``synthesize(n)``.

Real images, where a user has some, go to the compress calls as ``images=`` instead (the ceiling to read the
synthetic ones against).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from exml_fast._utils.checks import check_choice, check_int
from exml_fast._utils.progress import Progress
from exml_fast.synth.base import Synthesizer, check_input_shape, eval_mode, frozen, resolve_device
from exml_fast.synth.inversion import DataImpressions, DeepInversion, ModelInversion
from exml_fast.synth.matcher import BNStatsMatcher

__all__ = ["BN_MATCHING_METHODS", "CALIBRATION_METHODS", "ZEROQ_SETTINGS", "background", "check_classifier",
           "check_images", "has_batchnorm", "synthetic_images"]

#: the names :func:`synthetic_images` takes as ``method`` (a Synthesizer instance is accepted too)
CALIBRATION_METHODS: tuple[str, ...] = ("deepinversion", "zeroq", "data-impressions", "model-inversion", "noise")
#: ZeroQ's distilled-data recipe (its public ``distill_data.py``): Adam lr 0.5, 500 steps, batches of 32 from a
#: standard normal. The loss is the squared L2 distance of each BatchNorm input's per-channel mean and standard
#: deviation to the running ones (form "sq_std"), summed over the layers, plus the same distance of the input's
#: per-channel mean and standard deviation to 0 and 1. ZeroQ divides each layer's term by its channels and the sum
#: by the layers: a per-layer weighting that only matters relative to the other layers.
ZEROQ_SETTINGS = {"lr": 0.5, "iterations": 500, "batch_size": 32}
#: the methods that match BatchNorm statistics (and so need a BN layer with running statistics)
BN_MATCHING_METHODS: tuple[str, ...] = ("deepinversion", "zeroq")


def background(mean, std) -> float:
    """The normalised value of a black pixel, ``-mean / std`` (averaged over the channels; 0 without ``mean``):
    what :func:`exml_fast.training.distill`'s pad-and-crop pads with here."""
    if mean is None:
        return 0.0
    std = torch.as_tensor(1.0 if std is None else std, dtype=torch.float32)
    return float((-torch.as_tensor(mean, dtype=torch.float32) / std).mean())


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that keeps running statistics (what BN matching matches)."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
               for m in model.modules())


def check_classifier(model: nn.Module, input_shape: Sequence[int], owner: str) -> tuple[tuple[int, int, int], int]:
    """Checks that ``model`` maps (N, *input_shape) inputs to (N, K) logits with K >= 2.

    Returns ``(input_shape as a (C, H, W) tuple, K)``; raises TypeError / ValueError naming what is wrong (not a
    module, an input shape it does not take, an output that is not one row of class scores per input).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module classifier; got {type(model).__name__}")
    shape = check_input_shape(input_shape, owner)
    device = resolve_device(model, None, owner)
    x = torch.zeros(2, *shape, device=device)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
    except Exception as exc:  # any failure of the user's forward, reported with the shape we tried
        raise ValueError(f"{owner}: model does not take inputs of input_shape {shape} (a forward of a "
                         f"(2, {', '.join(map(str, shape))}) batch failed: {type(exc).__name__}: {exc})") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{owner}: model must be a classifier, (N, C, H, W) -> (N, K) logits with K >= 2; a "
                         f"(2, {', '.join(map(str, shape))}) batch gave {got}")
    return shape, int(out.shape[1])


def _zeroq(model: nn.Module, shape, n: int, *, seed: int, iterations: int, batch_size: int, lr: float,
           device: torch.device, progress: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    bar = Progress(total=-(-n // batch_size) * iterations, desc="zeroq", enabled=progress)
    try:
        with frozen(model), BNStatsMatcher(model, form="sq_std") as bn:
            for start in range(0, n, batch_size):
                x = torch.randn(min(batch_size, n - start), *shape, generator=gen).to(device).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                for _ in range(iterations):
                    opt.zero_grad(set_to_none=True)
                    model(x)
                    flat = x.transpose(0, 1).reshape(shape[0], -1)
                    loss = bn.loss() + flat.mean(1).square().sum() + (flat.std(1) - 1).square().sum()
                    loss.backward()
                    opt.step()
                    bar.update(1, {"loss": float(loss.detach())})
                batches.append(x.detach())
    finally:
        bar.close()
    return torch.cat(batches)


def check_images(images, shape: tuple[int, int, int], owner: str) -> torch.Tensor:
    """``images`` as an (N, *shape) float tensor, N >= 1; a TypeError / ValueError names what is wrong."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{owner}: images must be an (N, {', '.join(map(str, shape))}) float tensor; got "
                        f"{type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != shape or images.shape[0] < 1:
        raise ValueError(f"{owner}: images must be (N, {', '.join(map(str, shape))}) with N >= 1 (input_shape "
                         f"{shape}); got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{owner}: images must be a float tensor (normalised like the model's inputs); got "
                        f"{images.dtype}")
    return images


def synthetic_images(model: nn.Module, input_shape: Sequence[int], *, mean=None, std=None,
                     method: str | Synthesizer = "deepinversion", n: int = 256, seed: int = 0,
                     iterations: int | None = None, batch_size: int | None = None,
                     progress: bool = True, save_to: str | os.PathLike | None = None,
                     options: dict | None = None) -> torch.Tensor:
    """``n`` inputs for ``model`` made without its data, in the model's input space (normalised like its inputs).

    Args:
        model: a classifier, (N, C, H, W) -> (N, K) logits; not modified (put in eval mode while in use).
        input_shape: (C, H, W) of one input.
        mean, std: the input normalisation the model was trained with (a float or one per channel; None: the
            inputs are not normalised). Used by ``"deepinversion"`` (its image priors and pixel range).
        method: one of :data:`CALIBRATION_METHODS` or a :class:`~exml_fast.synth.Synthesizer` instance
            (see the module docstring).
        n: how many images, >= 1.
        seed: the seed of the draw (the same seed gives the same images).
        iterations, batch_size: synthesis steps per batch and the batch (None: the method's own; unused by
            ``"noise"`` and a Synthesizer instance's batch size is its own unless given).
        progress: show a progress bar.
        save_to: a folder for a synthesizer's batches as resumable shards (see
            :meth:`~exml_fast.synth.Synthesizer.synthesize`): a rerun continues after the last whole one. Unused by
            "zeroq" and "noise".
        options: keyword arguments of the named synthesizer's constructor (e.g. ``{"preset": "digits"}`` for
            DeepInversion, ``{"beta": 1.0}`` for Data Impressions); only with those methods.

    Returns:
        An (n, C, H, W) float32 tensor on the model's device.

    Raises:
        ValueError: ``model`` is not a classifier of ``input_shape`` inputs, or ``method`` matches BatchNorm
            statistics and ``model`` has none (use ``"noise"``, a Synthesizer such as ``ModelInversion``, or
            real ``images=``).
    """
    owner = "synthetic_images"
    shape, _ = check_classifier(model, input_shape, owner)
    n = check_int(n, "n", owner, low=1)
    seed = check_int(seed, "seed", owner)
    if not isinstance(method, Synthesizer):
        check_choice(method, "method", owner, CALIBRATION_METHODS)
        if method in BN_MATCHING_METHODS and not has_batchnorm(model):
            raise ValueError(f"{owner}: method={method!r} matches BatchNorm statistics, but {type(model).__name__} "
                             "has no BatchNorm layer with running statistics; use method='noise', a Synthesizer "
                             "instance (e.g. ModelInversion), or real images")
    if options and (isinstance(method, Synthesizer) or method in ("zeroq", "noise")):
        raise ValueError(f"{owner}: options are for the named synthesizers (deepinversion, data-impressions, "
                         f"model-inversion); got options with method={method!r}")
    device = resolve_device(model, None, owner)
    if method == "noise":
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    if method == "zeroq":
        return _zeroq(model, shape, n, seed=seed, device=device, progress=progress,
                      iterations=ZEROQ_SETTINGS["iterations"] if iterations is None else
                      check_int(iterations, "iterations", owner, low=1),
                      batch_size=ZEROQ_SETTINGS["batch_size"] if batch_size is None else
                      check_int(batch_size, "batch_size", owner, low=1),
                      lr=ZEROQ_SETTINGS["lr"])
    if isinstance(method, Synthesizer):
        synth = method
    else:
        kind = {"deepinversion": DeepInversion, "data-impressions": DataImpressions,
                "model-inversion": ModelInversion}
        synth = kind[method](model, input_shape=shape, mean=mean, std=std, **(options or {}))
    return synth.synthesize(n, iterations=iterations, batch_size=batch_size, generator=seed,
                            progress=progress, save_to=save_to).x.to(device, torch.float32)
