"""Building blocks shared by the ResNet-12 and ResNet-18 backbones."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def scaled_channels(channels: Sequence[int], width: float) -> tuple[int, ...]:
    """Stage widths times ``width`` (1.0 = the published model), rounded, at least 1."""
    return tuple(max(1, round(c * width)) for c in channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv_bn_shortcut(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """1x1 conv + BatchNorm projection shortcut; as a Sequential its keys are ``downsample.{0,1}``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def init_conv_bn(module: nn.Module, nonlinearity: str) -> None:
    """Kaiming-normal convs (fan_out, for ``nonlinearity``), BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
