"""ResNet-12, the paper's backbone: four residual blocks of three 3x3 convolutions, each ending in a 2x2
max-pool."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from bml.models.dropblock import DropBlock
from bml.models.layers import conv3x3, conv_bn_shortcut, init_conv_bn

RESNET12_CHANNELS = (64, 160, 320, 640)
DROPBLOCK_SIZE = 5
LEAKY_SLOPE = 0.1


class ResNet12Block(nn.Module):
    """conv-BN-LReLU, conv-BN-LReLU, conv-BN, + projection shortcut, LReLU, max-pool 2x2, then
    dropout (``drop_block=False``, blocks 1-2) or DropBlock (``drop_block=True``, blocks 3-4)."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.1,
                 drop_block: bool = False, block_size: int = DROPBLOCK_SIZE) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = conv_bn_shortcut(in_channels, out_channels)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_rate, block_size) if drop_block else nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.downsample(x))
        return self.drop(self.pool(out))


def resnet12_stage(in_channels: int, out_channels: int, drop_rate: float, drop_block: bool) -> nn.Sequential:
    """One block wrapped in a Sequential, so that keys read ``layerN.0.*`` as in released weights."""
    return nn.Sequential(ResNet12Block(in_channels, out_channels, drop_rate, drop_block))


class ResNet12(nn.Sequential):
    """Consecutive ResNet-12 stages ``layer1..layerN`` from RGB input.

    ``channels`` = (64, 160, 320) is BML's shared trunk, the full (64, 160, 320, 640) the
    baselines' encoder. Stages from ``dropblock_from`` (1-based) on use DropBlock.
    """

    def __init__(self, channels: Sequence[int] = RESNET12_CHANNELS, drop_rate: float = 0.1,
                 dropblock_from: int = 3, in_channels: int = 3) -> None:
        stages = OrderedDict()
        for index, out_channels in enumerate(channels, start=1):
            stages[f"layer{index}"] = resnet12_stage(in_channels, out_channels, drop_rate,
                                                     drop_block=index >= dropblock_from)
            in_channels = out_channels
        super().__init__(stages)
        self.out_channels = channels[-1]
        init_conv_bn(self, "leaky_relu")


class ResNet12View(nn.Sequential):
    """One BML view: its own fourth ResNet-12 block (with DropBlock), registered as ``layer``."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.1) -> None:
        super().__init__(OrderedDict(layer=resnet12_stage(in_channels, out_channels, drop_rate, drop_block=True)))
        self.out_channels = out_channels
        init_conv_bn(self, "leaky_relu")
