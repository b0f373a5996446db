"""The public DeepInversion BatchNorm feature hook, ported faithfully.

It is the baseline `BNStatsMatcher` is measured against: a forward hook per
BatchNorm2d that takes the input's mean, then a permute-contiguous copy for
the variance, and stores `||var - running_var||_2 + ||mean - running_mean||_2`.
The only change from the public code is a `remove()` the caller must call
(the original hooks were never removed, a defect the library avoids).
"""

from __future__ import annotations

import torch
from torch import nn


class DeepInversionFeatureHook:
    """Forward hook storing the BN-statistic distance of one layer's input in `r_feature`."""

    def __init__(self, module: nn.Module) -> None:
        self.hook = module.register_forward_hook(self.hook_fn)
        self.r_feature: torch.Tensor | None = None

    def hook_fn(self, module, input, output) -> None:
        nch = input[0].shape[1]
        # The public hook's [0, 2, 3] and (1, 0, 2, 3), for any rank (BatchNorm1d inputs too).
        rest = list(range(2, input[0].dim()))
        mean = input[0].mean([0, *rest])
        var = input[0].permute(1, 0, *rest).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(
            module.running_mean.data - mean, 2
        )

    def remove(self) -> None:
        self.hook.remove()


def deepinversion_bn_loss_hooks(model: nn.Module, *, all_bn: bool = False) -> list[DeepInversionFeatureHook]:
    """One hook per BatchNorm2d of `model`, in module order (as the public script did); with `all_bn`, per
    BatchNorm1d/2d/3d (the script's ResNets have only 2-D ones; LeNet-5-BN has 1-D ones too)."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) if all_bn else (nn.BatchNorm2d,)
    return [DeepInversionFeatureHook(m) for m in model.modules() if isinstance(m, kinds)]


def deepinversion_bn_loss(hooks: list[DeepInversionFeatureHook], first_bn_multiplier: float = 10.0):
    """The public script's weighted sum: the first layer's term times `first_bn_multiplier`."""
    rescale = [first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    return sum(h.r_feature * w for h, w in zip(hooks, rescale))
