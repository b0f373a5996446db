"""Generator networks that map a latent vector to an input of a classifier (SKD's knowledge delegator).

- :class:`SKDGenerator` with ``large=False`` — SKD Table IV (low resolution, DFAD's backbone)::

      z (N, latent_dim) → Linear → reshape (N, 128, H/4, W/4) → BN
        → upsample 2× → conv3x3(128) → BN → LeakyReLU(0.2)
        → upsample 2× → conv3x3(64)  → BN → LeakyReLU(0.2)
        → conv3x3(C) → tanh → helper BN(C)                     (N, C, H, W)

- ``width=0.25`` (``"skd-narrow"``) — Table IV with a quarter of the channels
  (32, 32, 16): about 16× fewer multiply-adds, for 28–32 px inputs on a CPU.

- ``large=True`` — SKD Table V (high resolution): the two upsample + conv
  stages become four stride-2 3×3 deconvolutions (512, 256, 128, 64
  channels) from (N, 512, H/16, W/16).

The **helper BN** at the output (SKD §III-B-2) is an affine BatchNorm2d over
the C channels: it normalises the generator's output towards the
distribution of (normalised) real inputs and is trained with the rest.

DAFL's and DFAD's public generators are Table IV's layers with two
differences: their output BN has no affine parameters (``helper_affine=False``),
and DAFL's two hidden convolutions are followed by BNs of ``eps`` 0.8 (its
``nn.BatchNorm2d(128, 0.8)``; ``bn_eps=0.8``), which damps their normalisation.
``"dafl"`` and ``"dfad"`` name them.

:data:`GENERATOR_ARCHS` names them (``"skd-small"``, ``"skd-narrow"``, ``"skd-large"``, ``"dafl"``,
``"dfad"``) for :class:`exml_fast.synth.GenerativeSynthesizer` and its saved files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from exml_fast._utils.checks import check_choice
from exml_fast.ops.upsample_conv import fusable_upsample_conv, upsample2x_conv3x3

__all__ = ["GENERATOR_ARCHS", "SKDGenerator", "build_generator"]


class SKDGenerator(nn.Module):
    """SKD's knowledge delegator: Table IV (``large=False``) or Table V (``large=True``), then the helper BN.

    Args:
        out_shape: (C, H, W) of the classifier's input. H and W must be
            divisible by 4 (Table IV) or by 16 (Table V).
        latent_dim: size of the Gaussian latent vector z.
        helper_bn: append the helper BN layer (SKD's ablation switches it off).
        width: multiplies every hidden channel count (1.0: the tables' widths; the
            ``"skd-narrow"`` arch is Table IV at 0.25, for CPU-sized budgets). Each
            count is rounded and at least 1.
        helper_affine: the helper BN has a trained scale and shift (SKD's); False:
            it only normalises (DAFL's and DFAD's output BN).
        bn_eps: the ``eps`` of the BNs after the hidden (de)convolutions (1e-5:
            torch's default; DAFL's generator: 0.8).

    ``forward(z)``: (N, latent_dim) → (N, C, H, W). Each upsample-then-3×3-convolution pair of Table IV runs
    as :func:`exml_fast.ops.upsample_conv.upsample2x_conv3x3` (the same function with 2.25× fewer FLOPs and no
    upsampled tensor) on CPU tensors; set ``fuse_upsample_conv`` on an instance to ``True`` or ``False`` to
    fuse, or run the layers one by one, on every device. The modules, and so the ``state_dict``, are the same
    either way.
    """

    #: Run Table IV's upsample + convolution pairs as :func:`upsample2x_conv3x3`: ``None`` (the default) on CPU
    #: tensors only, ``True`` everywhere, ``False`` nowhere (tests switch it to compare). On an H100 the
    #: composite's einsum, 2×2 convolution and interleave took 3-8× the time of ``F.interpolate`` + cuDNN's
    #: convolution at batch 32, and a DFAD fit step 1.6× (benches/results/gpu/benches/upsample_conv_cuda_quick.md).
    fuse_upsample_conv: bool | None = None

    def __init__(self, out_shape: Sequence[int], *, latent_dim: int = 100, large: bool = False,
                 helper_bn: bool = True, width: float = 1.0, helper_affine: bool = True,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        c, h, w = (int(s) for s in out_shape)
        step = 16 if large else 4
        if h % step or w % step:
            raise ValueError(f"SKDGenerator: out_shape {tuple(out_shape)} must have H and W divisible by {step} "
                             f"({'Table V, large=True' if large else 'Table IV, large=False'})")
        if latent_dim < 1:
            raise ValueError(f"SKDGenerator: latent_dim must be >= 1; got {latent_dim}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"SKDGenerator: width must be a number > 0; got {width!r}")
        if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or not bn_eps > 0:
            raise ValueError(f"SKDGenerator: bn_eps must be a number > 0; got {bn_eps!r}")
        self.out_shape = (c, h, w)
        self.latent_dim = latent_dim
        self.width = float(width)

        def ch(n: int) -> int:
            return max(1, round(n * width))

        base = ch(512 if large else 128)
        self._start = (base, h // step, w // step)
        self.project = nn.Linear(latent_dim, base * (h // step) * (w // step))
        layers: list[nn.Module] = [nn.BatchNorm2d(base)]
        if large:
            prev = base
            for n in (512, 256, 128, 64):
                layers += [nn.ConvTranspose2d(prev, ch(n), 3, stride=2, padding=1, output_padding=1),
                           nn.BatchNorm2d(ch(n), eps=bn_eps), nn.LeakyReLU(0.2, inplace=True)]
                prev = ch(n)
        else:
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(base, ch(128), 3, padding=1),
                       nn.BatchNorm2d(ch(128), eps=bn_eps), nn.LeakyReLU(0.2, inplace=True),
                       nn.Upsample(scale_factor=2), nn.Conv2d(ch(128), ch(64), 3, padding=1),
                       nn.BatchNorm2d(ch(64), eps=bn_eps), nn.LeakyReLU(0.2, inplace=True)]
            prev = ch(64)
        layers += [nn.Conv2d(prev, c, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.helper_bn = nn.BatchNorm2d(c, affine=helper_affine) if helper_bn else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], *self._start)
        layers = list(self.body)
        fuse = x.device.type == "cpu" if self.fuse_upsample_conv is None else self.fuse_upsample_conv
        k = 0
        while k < len(layers):
            if fuse and k + 1 < len(layers) and fusable_upsample_conv(layers[k], layers[k + 1]):
                x = upsample2x_conv3x3(x, layers[k + 1].weight, layers[k + 1].bias)
                k += 2
            else:
                x = layers[k](x)
                k += 1
        return self.helper_bn(x)


def _small(out_shape: Sequence[int], *, latent_dim: int = 100, helper_bn: bool = True) -> SKDGenerator:
    return SKDGenerator(out_shape, latent_dim=latent_dim, large=False, helper_bn=helper_bn)


def _narrow(out_shape: Sequence[int], *, latent_dim: int = 100, helper_bn: bool = True) -> SKDGenerator:
    return SKDGenerator(out_shape, latent_dim=latent_dim, large=False, helper_bn=helper_bn, width=0.25)


def _large(out_shape: Sequence[int], *, latent_dim: int = 100, helper_bn: bool = True) -> SKDGenerator:
    return SKDGenerator(out_shape, latent_dim=latent_dim, large=True, helper_bn=helper_bn)


def _dafl(out_shape: Sequence[int], *, latent_dim: int = 100, helper_bn: bool = True) -> SKDGenerator:
    return SKDGenerator(out_shape, latent_dim=latent_dim, large=False, helper_bn=helper_bn, helper_affine=False,
                        bn_eps=0.8)


def _dfad(out_shape: Sequence[int], *, latent_dim: int = 100, helper_bn: bool = True) -> SKDGenerator:
    return SKDGenerator(out_shape, latent_dim=latent_dim, large=False, helper_bn=helper_bn, helper_affine=False)


#: Generator architectures by name: ``GENERATOR_ARCHS[name](out_shape, latent_dim=..., helper_bn=...)``.
#: "dafl" and "dfad": DAFL's and DFAD's public MNIST/CIFAR generators (Table IV's layers and widths, see the
#: module docstring).
GENERATOR_ARCHS: dict[str, Callable[..., nn.Module]] = {"skd-small": _small, "skd-narrow": _narrow,
                                                        "skd-large": _large, "dafl": _dafl, "dfad": _dfad}


def build_generator(arch: str, out_shape: Sequence[int], **kwargs) -> nn.Module:
    """``GENERATOR_ARCHS[arch](out_shape, **kwargs)``, with an error that lists the known names."""
    check_choice(arch, "arch", "build_generator", GENERATOR_ARCHS)
    return GENERATOR_ARCHS[arch](out_shape, **kwargs)
