"""Reference per-sample augmentation (roll-jitter, horizontal flip, pad-crop).

Per sample n with parameters (dy, dx, flip, oy, ox) and pad-crop padding p:
roll by (dy, dx) (`torch.roll` semantics), flip the last dim if `flip`, zero-pad
every side by p and crop H x W at offset (oy, ox) (torchvision
`RandomCrop(size, padding=p)`). Output pixel (i, j) is 0 where the crop reads
padding, else `x[(u - dy) mod H, (v' - dx) mod W]` with u = i + oy - p,
v = j + ox - p and v' = W - 1 - v if flip else v.

`augment_with_params` is a vectorised gather with index tensors (the oracle and
the benchmark baseline); `augment_with_params_loop` is the per-sample loop of
torch.roll / torch.flip / F.pad a user would write (a second, independent
oracle); `batch_augment_public` is what the public DeepInversion and ExML code
did — ONE draw for the whole batch — kept for the benchmark only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PARAM_NAMES = ("dy", "dx", "flip", "oy", "ox")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout augment returns: channels_last for channels_last-dense x, else NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def draw_augment_params(
    n: int,
    *,
    max_shift: int,
    flip: bool = True,
    pad_crop: int = 0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws one parameter set per sample, on `device`, without a host sync.

    Returns an (n, 5) int64 tensor of (dy, dx, flip, oy, ox): dy, dx uniform in
    [-max_shift, max_shift]; flip 0 or 1 with probability 1/2 each (always 0
    when `flip` is False); oy, ox uniform in [0, 2 * pad_crop]. Every value is
    an independent draw from `generator` (None: torch's default generator of
    `device`).
    """
    from exml_fast._utils.checks import check_int

    owner = "draw_augment_params"
    n = check_int(n, "n", owner, low=0)
    max_shift = check_int(max_shift, "max_shift", owner, low=0)
    pad_crop = check_int(pad_crop, "pad_crop", owner, low=0)
    kw = {"generator": generator, "device": device, "dtype": torch.int64}
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), **kw)
    flips = (torch.randint(0, 2, (n, 1), **kw) if flip
             else torch.zeros((n, 1), dtype=torch.int64, device=device))
    crops = (torch.randint(0, 2 * pad_crop + 1, (n, 2), **kw) if pad_crop > 0
             else torch.zeros((n, 2), dtype=torch.int64, device=device))
    return torch.cat([shifts, flips, crops], dim=1)


def augment_with_params(x: torch.Tensor, params: torch.Tensor, *, pad_crop: int = 0) -> torch.Tensor:
    """Applies per-sample (dy, dx, flip, oy, ox) `params` (N, 5) to x (N, C, H, W)."""
    n, c, h, w = x.shape
    fmt = output_memory_format(x)
    if x.numel() == 0:
        return x.clone(memory_format=fmt)  # keeps the autograd graph
    dy, dx, fl, oy, ox = params.to(device=x.device, dtype=torch.int64).unbind(1)
    i = torch.arange(h, device=x.device)
    j = torch.arange(w, device=x.device)
    u = i[None, :] + (oy - pad_crop)[:, None]  # (N, H) rows of the padded-then-cropped image
    v = j[None, :] + (ox - pad_crop)[:, None]  # (N, W)
    ok = (((u >= 0) & (u < h))[:, :, None] & ((v >= 0) & (v < w))[:, None, :])
    v = torch.where(fl[:, None] != 0, w - 1 - v, v)
    src_r = torch.remainder(u - dy[:, None], h)
    src_c = torch.remainder(v - dx[:, None], w)
    idx = (src_r[:, :, None] * w + src_c[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(x.reshape(n, c, h * w), 2, idx).reshape(n, c, h, w)
    out = torch.where(ok[:, None], out, torch.zeros((), dtype=x.dtype, device=x.device))
    return out.contiguous(memory_format=fmt)


def augment_with_params_loop(
    x: torch.Tensor, params: torch.Tensor, *, pad_crop: int = 0
) -> torch.Tensor:
    """The same map as `augment_with_params`, one sample at a time with
    torch.roll, torch.flip and F.pad (reads params on the host)."""
    n, c, h, w = x.shape
    p = pad_crop
    outs = []
    for xn, (dy, dx, fl, oy, ox) in zip(x, params.tolist()):
        y = torch.roll(xn, shifts=(dy, dx), dims=(-2, -1))
        if fl:
            y = torch.flip(y, dims=(-1,))
        if p > 0:
            y = F.pad(y, (p, p, p, p))[:, oy:oy + h, ox:ox + w]
        outs.append(y)
    if not outs:
        return x.clone(memory_format=output_memory_format(x))
    return torch.stack(outs).contiguous(memory_format=output_memory_format(x))


def augment(
    x: torch.Tensor,
    *,
    max_shift: int,
    flip: bool = True,
    pad_crop: int = 0,
    generator: torch.Generator | None = None,
    return_params: bool = False,
):
    """Per-sample roll-jitter, flip and pad-crop of x (N, C, H, W); see exml_fast.ops.augment."""
    params = draw_augment_params(x.shape[0], max_shift=max_shift, flip=flip, pad_crop=pad_crop,
                                 device=x.device, generator=generator)
    out = augment_with_params(x, params, pad_crop=pad_crop)
    return (out, params) if return_params else out


def batch_augment_public(
    x: torch.Tensor,
    *,
    max_shift: int,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The public code's augmentation: ONE random roll and ONE coin flip for the
    whole batch (drawn on the host, like `random.randint`). Benchmark only: it
    is not the per-sample augmentation."""
    g = generator if generator is not None and generator.device.type == "cpu" else None
    dy, dx, coin = torch.randint(-max_shift, max_shift + 1, (3,), generator=g).tolist()
    y = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and coin % 2 == 0:
        y = torch.flip(y, dims=(3,))
    return y
