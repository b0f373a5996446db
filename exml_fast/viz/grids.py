"""Image grids of synthetic (or real) batches, for looking at what a synthesizer made.

Example::

    batch = DeepInversion(teacher, input_shape=(1, 32, 32), mean=0.1307, std=0.3081).synthesize(100)
    save_grid(batch, "runs/di/grid.png")        # 10 x 10, one class per row when balanced

Needs torchvision (the ``vision`` extra) for the PNG encoder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from exml_fast._utils.checks import per_channel
from exml_fast._utils.io import atomic_write

__all__ = ["save_grid", "to_unit_range"]


def _channel_stats(value: float | Sequence[float] | torch.Tensor, *, name: str, channels: int) -> torch.Tensor:
    """``value`` as a float32 (C, 1, 1) tensor (:func:`~exml_fast._utils.checks.per_channel`: a scalar or a
    1-element sequence is broadcast; a std must be > 0)."""
    vals = per_channel(value, channels, name, "save_grid", positive=name == "std")
    return torch.tensor(vals, dtype=torch.float32).reshape(channels, 1, 1)


def to_unit_range(
    x: torch.Tensor,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Images ``x`` (N, C, H, W) mapped to [0, 1] for display, as a new float32 CPU tensor.

    With ``mean`` and ``std`` (a float or one value per channel), undoes the
    normalisation ``(pixel - mean) / std`` and clamps to [0, 1]. With neither,
    min-max scales the whole tensor (a constant tensor gives 0.5 everywhere).
    Giving only one of the two is an error.
    """
    if x.dim() != 4:
        raise ValueError(f"save_grid: images must be a 4-D (N, C, H, W) tensor; got shape {tuple(x.shape)}")
    if (mean is None) != (std is None):
        raise ValueError("save_grid: give both mean and std (to un-normalise) or neither (to min-max scale); "
                         f"got mean={mean!r}, std={std!r}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if mean is not None:
        c = x.shape[1]
        m = _channel_stats(mean, name="mean", channels=c)
        s = _channel_stats(std, name="std", channels=c)
        return (x * s + m).clamp_(0.0, 1.0)
    if x.numel() == 0:
        return x.clone()
    lo, hi = x.min(), x.max()
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError("save_grid: images hold non-finite values (inf or nan); cannot min-max scale them")
    if hi > lo:
        return (x - lo) / (hi - lo)
    return torch.full_like(x, 0.5)


def save_grid(
    batch: Any,
    path: str | os.PathLike,
    *,
    nrow: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    sort_by_class: bool = True,
) -> torch.Tensor:
    """Writes the images of ``batch`` as one PNG grid at ``path`` (atomically).

    Args:
        batch: a :class:`~exml_fast.synth.SyntheticBatch` (or any object with
            attributes ``x`` (N, C, H, W), ``y`` (N,) or None, ``mean``,
            ``std``), or a plain (N, C, H, W) tensor. C must be 1 (grey) or
            3 (RGB).
        path: the file to write. The content is always PNG, whatever the
            extension; parent folders are created.
        nrow: images per grid row; default ``ceil(sqrt(N))`` (so 100 images of
            10 balanced classes, sorted, give one class per row).
        mean, std: the normalisation to undo (a float or one value per
            channel); they override the batch's own ``mean``/``std``. When
            neither the arguments nor the batch give them, the whole tensor is
            min-max scaled to [0, 1]. Pixels are clamped to [0, 1].
        sort_by_class: order the images by label (stable) when the batch has labels.

    Returns:
        The (N, C, H, W) float32 images in [0, 1], in grid order, that were written.
    """
    if isinstance(batch, torch.Tensor):
        x, y, b_mean, b_std = batch, None, None, None
    elif hasattr(batch, "x"):
        x = batch.x
        y = getattr(batch, "y", None)
        b_mean, b_std = getattr(batch, "mean", None), getattr(batch, "std", None)
    else:
        raise TypeError(
            "save_grid: batch must be a SyntheticBatch (or an object with attributes x, y, mean, std) or an "
            f"(N, C, H, W) tensor; got {type(batch).__name__}"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"save_grid: batch.x must be a tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"save_grid: images must be a 4-D (N, C, H, W) tensor; got shape {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    if n == 0:
        raise ValueError("save_grid: the batch is empty (N = 0); there is nothing to draw")
    if c not in (1, 3):
        raise ValueError(f"save_grid: images must have 1 (grey) or 3 (RGB) channels; got C = {c}")
    if nrow is not None and (not isinstance(nrow, int) or nrow < 1):
        raise ValueError(f"save_grid: nrow must be a positive int or None; got {nrow!r}")
    if mean is None and std is None:
        mean, std = b_mean, b_std
    elif mean is None or std is None:
        # One given, the other from the batch: allowed, the pair is checked below.
        mean = b_mean if mean is None else mean
        std = b_std if std is None else std

    images = to_unit_range(x, mean=mean, std=std)
    if sort_by_class and y is not None:
        y = torch.as_tensor(y).detach().cpu().flatten()
        if y.numel() != n:
            raise ValueError(f"save_grid: batch.y has {y.numel()} labels for {n} images")
        images = images[torch.sort(y, stable=True).indices]
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(n)))

    try:
        from torchvision.utils import save_image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("save_grid needs torchvision: pip install 'exml_fast[vision]'") from e
    atomic_write(path, lambda f: save_image(images, f, nrow=nrow, padding=2, format="png"))
    return images
