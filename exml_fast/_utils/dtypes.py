"""The dtypes every op accepts and the one it accumulates in."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["FLOAT_DTYPES", "PRECISIONS", "acc_dtype", "autocast_dtype", "autocast_to", "autocast_to_float32"]

#: The floating dtypes every op accepts (computed in fp32, or fp64 for fp64 input).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: A ``precision`` option's values: the autocast dtype of each (None: no autocast, float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and statistics, loss) dtype for input of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device_type`` now, or None when it is off there (or the device
    type has no autocast, e.g. "meta")."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_to(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype=dtype)``, or a context that does nothing for ``dtype`` None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def autocast_to_float32(*tensors):
    """``tensors`` with the 16-bit floating ones cast to float32 when ``torch.autocast`` is on for the first
    one's device type, else as given (non-tensors too, for the caller's checks to name).

    Autocast's policy for the ops on its float32 list, ``log_softmax``, ``kl_div`` and the other losses among
    them: a loss over logits that a 16-bit forward produced is taken in float32, whatever the dtype of the
    targets it meets (float32 soft targets kept from outside the autocast region, say). Float64 is left as
    it is, as autocast leaves it."""
    first = tensors[0] if tensors else None
    if not isinstance(first, torch.Tensor):
        return tensors
    if autocast_dtype(first.device.type) is None:
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)
