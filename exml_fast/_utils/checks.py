"""Argument checks shared by every layer: one wording for every error on bad input.

Each check names its owner (the function or class that was called), the argument, what it accepts and what it
received, and returns the value in the type the caller keeps (``int``, ``float``, a tuple of floats).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from exml_fast._utils.dtypes import FLOAT_DTYPES

__all__ = ["check_affine", "check_choice", "check_float", "check_image_batch", "check_int", "cpu_generator",
           "per_channel"]


def check_int(value: Any, name: str, owner: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]`` (either bound optional); else ValueError
    ``"<owner>: <name> must be an int >= low; got value"`` (or ``in [low, high]``, ``<= high``)."""
    if (isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low)
            or (high is not None and value > high)):
        if low is not None and high is not None:
            bound = f" in [{low}, {high}]"
        elif low is not None:
            bound = f" >= {low}"
        elif high is not None:
            bound = f" <= {high}"
        else:
            bound = ""
        raise ValueError(f"{owner}: {name} must be an int{bound}; got {value!r}")
    return value


def cpu_generator(generator: Any, owner: str) -> torch.Generator | None:
    """``generator`` as a CPU ``torch.Generator`` (an int is a seed) or None (torch's global one). Draws made on
    the CPU give a seed the same run on every device; a generator on another device is refused."""
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"{owner}: generator must be a CPU torch.Generator (draws are made on the "
                             f"CPU so that a seed gives the same run on every device); got one on "
                             f"{generator.device}")
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"{owner}: generator must be None, an int seed or a torch.Generator; "
                    f"got {type(generator).__name__}")


def check_choice(value: Any, name: str, owner: str, choices) -> Any:
    """``value`` if it is one of ``choices`` (a tuple, or a dict / set of names; a bool never matches); else
    ValueError ``"<owner>: <name> must be one of a, b, c; got value"`` (an unhashable value too, not a
    TypeError)."""
    try:
        ok = not isinstance(value, bool) and value in choices
    except TypeError:  # an unhashable value against a dict or set of names
        ok = False
    if not ok:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_float(value: Any, name: str, owner: str, *, positive: bool = False) -> float:
    """``float(value)`` if it is a finite real number >= 0 (> 0 with ``positive``); else ValueError
    ``"<owner>: <name> must be a finite number >= 0; got value"``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0
            or (positive and value == 0)):
        raise ValueError(f"{owner}: {name} must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}")
    return float(value)


def check_affine(degrees: Any, scale: Any, owner: str, *,
                 names: tuple[str, str] = ("degrees", "scale")) -> tuple[float, float]:
    """``(float(degrees), float(scale))`` if they are a random rotation's largest angle, in [0, 180] degrees, and a
    random zoom's range, in [0, 1); else ValueError ``"<owner>: <name> must be ...; got value"``, where the names
    are ``names`` (``("rotate", "scale")`` where the caller's arguments are called so)."""
    degrees, scale = check_float(degrees, names[0], owner), check_float(scale, names[1], owner)
    if degrees > 180:
        raise ValueError(f"{owner}: {names[0]} must be an angle in [0, 180] degrees; got {degrees!r}")
    if scale >= 1:
        raise ValueError(f"{owner}: {names[1]} must be a zoom range in [0, 1); got {scale!r}")
    return degrees, scale


def per_channel(value: Any, channels: int, name: str, owner: str, *,
                positive: bool = False) -> tuple[float, ...] | None:
    """A per-channel statistic (a normalisation mean or std) as ``channels`` floats.

    ``value`` may be None (returned as is), a number or a 1-element sequence (broadcast to every channel), a
    sequence or tensor of ``channels`` numbers. Every value must be finite, and > 0 with ``positive`` (a std).

    Raises:
        TypeError: not a number, a sequence or a tensor.
        ValueError: another count than 1 or ``channels``, a non-finite value, or a value <= 0 with ``positive``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a float or a sequence of {channels} floats; got bool")
    if isinstance(value, numbers.Real):
        vals = (float(value),) * channels
    elif isinstance(value, torch.Tensor):
        vals = tuple(float(v) for v in value.reshape(-1).tolist())
    else:
        try:
            vals = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"{owner}: {name} must be a float or a sequence of {channels} floats; "
                            f"got {type(value).__name__}") from None
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{owner}: {name} must have one value per input channel or a single value (1 or "
                         f"{channels} values); got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{owner}: {name} must be finite; got {list(vals)}")
    if positive and any(v <= 0 for v in vals):
        raise ValueError(f"{owner}: {name} must be > 0; got {list(vals)}")
    return vals


def check_tensor(x: Any, name: str, owner: str) -> None:
    """``x`` is a torch.Tensor: else TypeError ``"<owner>: <name> must be a torch.Tensor; got ..."``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor; got {type(x).__name__}")


def check_float_dtype(x: torch.Tensor, name: str, owner: str) -> None:
    """``x`` has a float dtype the ops accept: else TypeError ``"<owner>: <name> must be float32, ...; got ..."``."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{owner}: {name} must be float32, float64, float16 or bfloat16; got {x.dtype}")


def check_image_batch(x: Any, owner: str) -> None:
    """``x`` is an (N, C, H, W) tensor of a float dtype the ops accept: else TypeError (not a tensor, another
    dtype) or ValueError (other dims), ``"<owner>: x must ...; got ..."``."""
    check_tensor(x, "x", owner)
    if x.dim() != 4:
        raise ValueError(f"{owner}: x must have shape (N, C, H, W); got {x.dim()} dims with shape "
                         f"{tuple(x.shape)}")
    check_float_dtype(x, "x", owner)
