"""The dtypes every op accepts and the one it accumulates in."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "acc_dtype", "autocast_to_float32"]

#: The floating dtypes every op accepts (computed in fp32, or fp64 for fp64 input).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and statistics, loss) dtype for input of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    device_type = first.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)
