"""torchvision's MobileNetV2 with any number of input channels (torchvision is imported lazily)."""

from __future__ import annotations

from torch import nn

__all__ = ["mobilenet_v2"]


def mobilenet_v2(num_classes: int = 10, *, in_channels: int = 3, **kwargs) -> nn.Module:
    """``torchvision.models.mobilenet_v2(num_classes=num_classes, **kwargs)``, (N, C, H, W) → (N, num_classes).

    With ``in_channels`` ≠ 3 the first 3x3 stride-2 convolution is replaced by one
    that takes ``in_channels`` inputs (same output channels, stride and padding).
    ``kwargs`` go to torchvision (e.g. ``width_mult=0.5``). The network downsamples
    by 32, so a 32x32 input reaches the classifier as 1x1 features.
    """
    try:
        from torchvision.models import mobilenet_v2 as tv_mobilenet_v2
    except ImportError as e:  # pragma: no cover - torchvision is in the test environment
        raise ImportError("the mobilenet_v2 architecture needs torchvision: pip install torchvision") from e
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"mobilenet_v2: in_channels must be an int >= 1; got {in_channels!r}")
    model = tv_mobilenet_v2(num_classes=num_classes, **kwargs)
    if in_channels != 3:
        old = model.features[0][0]
        conv = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                         padding=old.padding, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")  # torchvision's initialisation of its convs
        model.features[0][0] = conv
    return model
