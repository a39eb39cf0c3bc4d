"""ResNet-18 variant of BML (the released code's ``--backbone Res18``): torchvision-style basic blocks on a
3x3 stride-1 stem, for 84 px inputs; no dropout or DropBlock."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from bml.models.layers import conv3x3, conv_bn_shortcut, init_conv_bn

RESNET18_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        reshapes = stride != 1 or in_channels != out_channels
        self.downsample = conv_bn_shortcut(in_channels, out_channels, stride) if reshapes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


def basic_stage(in_channels: int, out_channels: int, stride: int, blocks: int = BLOCKS_PER_STAGE) -> nn.Sequential:
    """``blocks`` basic blocks; only the first one strides and changes the width."""
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride),
        *(BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)),
    )


class ResNet18(nn.Sequential):
    """Stem ``conv1``-``bn1``-ReLU, then stages ``layer1..layerN`` (the first at stride 1, the
    others at stride 2).

    ``channels`` = (64, 128, 256) is BML's shared trunk. With a fourth stage (the baselines'
    encoder) the network ends like a BML view, with a 2x2 max-pool (84 px -> 5x5).
    """

    def __init__(self, channels: Sequence[int] = RESNET18_CHANNELS, in_channels: int = 3) -> None:
        layers = OrderedDict(
            conv1=nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False),
            bn1=nn.BatchNorm2d(channels[0]),
            relu=nn.ReLU(inplace=True),
        )
        in_channels = channels[0]
        for index, out_channels in enumerate(channels, start=1):
            layers[f"layer{index}"] = basic_stage(in_channels, out_channels, stride=1 if index == 1 else 2)
            in_channels = out_channels
        if len(channels) == 4:
            layers["pool"] = nn.MaxPool2d(2)
        super().__init__(layers)
        self.out_channels = channels[-1]
        init_conv_bn(self, "relu")


class ResNet18View(nn.Sequential):
    """One BML view: its own ``layer4`` (two basic blocks, stride 2), then a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict(layer4=basic_stage(in_channels, out_channels, stride=2), pool=nn.MaxPool2d(2)))
        self.out_channels = out_channels
        init_conv_bn(self, "relu")
