"""Per-sample augmentation for model inversion and distillation: roll-jitter,
horizontal flip and pad-crop, each sample with its own random draw.

The public DeepInversion / ExML code drew ONE random roll and flip per batch;
here every sample gets its own (dy, dx, flip, oy, ox). The draw happens on x's
device (no host sync); the gather runs in one fused kernel, forward and
backward, and the same draw can be re-applied with `augment_with_params`.
"""

from __future__ import annotations

import torch

from exml_fast import _ext
from exml_fast._utils.checks import check_image_batch

# Names, not the module: exml_fast.reference re-exports a function `augment`,
# which shadows the submodule as an attribute of the package.
from exml_fast.reference.augment import augment_with_params as _ref_augment_with_params
from exml_fast.reference.augment import draw_augment_params, output_memory_format

__all__ = ["augment", "augment_with_params", "draw_augment_params"]

_MAX_EXTENT = (2**31 - 1) // 4  # the kernels' limit on pad_crop, H and W


def _check_x(x: torch.Tensor, op: str) -> None:
    check_image_batch(x, op)
    if x.shape[2] > _MAX_EXTENT or x.shape[3] > _MAX_EXTENT:
        raise ValueError(f"{op}: x's height and width must be at most {_MAX_EXTENT}; "
                         f"got shape {tuple(x.shape)}")


def _check_extent(value, name: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int; got {type(value).__name__}")
    if not 0 <= value <= _MAX_EXTENT:
        raise ValueError(f"{op}: {name} must be an int in [0, {_MAX_EXTENT}]; got {value}")
    return value


def _check_params(x: torch.Tensor, params: torch.Tensor, pad_crop: int, op: str, *, values: bool = True) -> None:
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"{op}: params must be a torch.Tensor; got {type(params).__name__}")
    if params.dim() != 2 or params.shape[0] != x.shape[0] or params.shape[1] != 5:
        raise ValueError(f"{op}: params must have shape (N, 5) = ({x.shape[0]}, 5) holding "
                         f"(dy, dx, flip, oy, ox) per sample; got {tuple(params.shape)}")
    if params.dtype == torch.bool or params.is_floating_point() or params.is_complex():
        raise TypeError(f"{op}: params must be an integer tensor (int32 or int64); got {params.dtype}")
    if params.device != x.device:
        raise ValueError(f"{op}: params is on {params.device} but x is on {x.device}")
    # Values are checked where that needs no device sync (CPU, eager). On CUDA
    # any values are still well defined: shifts wrap, a nonzero flip flips, and
    # crop offsets outside [0, 2 * pad_crop] read more padding (zeros).
    if values and params.device.type == "cpu" and params.shape[0] > 0 and not torch.compiler.is_compiling():
        flips, crops = params[:, 2], params[:, 3:]
        if bool(((flips != 0) & (flips != 1)).any()):
            raise ValueError(f"{op}: params[:, 2] (flip) must be 0 or 1; got values "
                             f"{sorted(set(flips.tolist()))[:8]}")
        if bool(((crops < 0) | (crops > 2 * pad_crop)).any()):
            raise ValueError(f"{op}: params[:, 3:5] (oy, ox) must lie in [0, 2 * pad_crop] = "
                             f"[0, {2 * pad_crop}]; got min {int(crops.min())}, max {int(crops.max())}")


def augment_with_params(x: torch.Tensor, params: torch.Tensor, *, pad_crop: int = 0,
                        check_values: bool = True) -> torch.Tensor:
    """Applies given per-sample augmentation parameters to x.

    Use it to apply one draw to several tensors (a teacher's and a student's
    input, a mask): `y, params = augment(x, ..., return_params=True)`, then
    `augment_with_params(mask, params, pad_crop=...)`.

    Args:
        x: (N, C, H, W) float32/float64/float16/bfloat16. NCHW and channels_last
            are read without a copy; other strides are copied once.
        params: (N, 5) integer tensor on x's device, per sample (dy, dx, flip,
            oy, ox) as drawn by `augment` / `draw_augment_params`: roll by
            (dy, dx) pixels (any integers: they wrap mod H, W as in torch.roll),
            flip the last dim if flip == 1, then zero-pad by `pad_crop` and crop
            H x W at offset (oy, ox) in [0, 2 * pad_crop]. Values are checked on
            CPU; on CUDA they are not (that would sync the host) but any values
            are well defined (nonzero flip flips; offsets out of range read zeros).
        pad_crop: the pad-crop padding p >= 0 (0: no pad-crop).
        check_values: check the flip and crop values on the CPU (two reads of
            the host's answer, a dozen small ops). False skips them for
            parameters known to be valid, e.g. drawn by `draw_augment_params`
            (the synthesizers' step, which then makes no host read at all);
            shapes, dtypes and devices are always checked.

    Returns:
        (N, C, H, W), x's dtype, channels_last if x is channels_last, else NCHW.
        Bit-exact (a pure gather). Differentiable w.r.t. x, to any order: the
        backward is the inverse gather, zeros where no output read the input.
    """
    op = "augment_with_params"
    _check_x(x, op)
    pad_crop = _check_extent(pad_crop, "pad_crop", op)
    _check_params(x, params, pad_crop, op, values=check_values)
    if _ext.use_compiled(x):
        return torch.ops.exml_fast.augment_with_params(x, params, pad_crop)
    return _ref_augment_with_params(x, params, pad_crop=pad_crop)


def augment(
    x: torch.Tensor,
    *,
    max_shift: int,
    flip: bool = True,
    pad_crop: int = 0,
    generator: torch.Generator | None = None,
    return_params: bool = False,
):
    """Random roll-jitter, horizontal flip and pad-crop, drawn per sample.

    For each sample independently: roll by (dy, dx) uniform in
    [-max_shift, max_shift]^2 (circular, torch.roll semantics); then, if
    `flip`, mirror the last dim with probability 1/2; then, if pad_crop = p > 0,
    zero-pad by p and crop back to H x W at (oy, ox) uniform in [0, 2p]^2
    (torchvision RandomCrop(size, padding=p)). DeepInversion uses max_shift 2
    at 32 px and 30 at 224 px; the ExML MNIST setting is pad_crop 4.

    Args:
        x: (N, C, H, W) float32/float64/float16/bfloat16, NCHW or channels_last.
        max_shift: largest roll in pixels, an int >= 0. A roll by max_shift >= H
            (or W) is legal and wraps, but the shift mod H is then not uniform.
        flip: whether to draw a random horizontal flip.
        pad_crop: the padding p of the random crop, an int >= 0 (0: none).
        generator: the torch.Generator to draw from; it must be on x's device
            (None: torch's default generator of that device). torch.compile
            cannot trace a Generator object (a graph break): under
            fullgraph=True pass None, or draw with `draw_augment_params` outside
            and call `augment_with_params`.
        return_params: also return the (N, 5) int64 params (dy, dx, flip, oy, ox)
            so that `augment_with_params` can apply the same draw again.

    Returns:
        `out` (N, C, H, W) in x's dtype and memory format, or `(out, params)`.
        The draw runs on x's device with torch.randint (no host sync on CUDA).
    """
    op = "augment"
    _check_x(x, op)
    max_shift = _check_extent(max_shift, "max_shift", op)
    pad_crop = _check_extent(pad_crop, "pad_crop", op)
    if not isinstance(flip, bool):
        raise TypeError(f"{op}: flip must be a bool; got {type(flip).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: generator must be a torch.Generator or None; "
                            f"got {type(generator).__name__}")
        gd = generator.device
        if gd.type != x.device.type or (
            gd.index is not None and x.device.index is not None and gd.index != x.device.index
        ):
            raise ValueError(f"{op}: generator is on {gd} but x is on {x.device}; pass a "
                             f"torch.Generator(device={str(x.device)!r}) or None")
    params = draw_augment_params(x.shape[0], max_shift=max_shift, flip=flip, pad_crop=pad_crop,
                                 device=x.device, generator=generator)
    if _ext.use_compiled(x):
        out = torch.ops.exml_fast.augment_with_params(x, params, pad_crop)
    else:
        out = _ref_augment_with_params(x, params, pad_crop=pad_crop)
    return (out, params) if return_params else out


def _register() -> None:
    """Fake kernels for the compiled ops (only when _C loaded). Their autograd is in C++
    (csrc/ops/augment.cpp): a Python autograd node would cost more per call than the gather."""

    def fake(t, params, pad):
        return torch.empty_like(t, memory_format=output_memory_format(t))

    torch.library.register_fake("exml_fast::augment_with_params")(fake)
    torch.library.register_fake("exml_fast::_augment_with_params_backward")(fake)


if _ext.has_ops():
    _register()
