"""Backbone factories: the shared trunk, one view, and the full encoder, per backbone name."""

from __future__ import annotations

from torch import nn

from bml.models.layers import scaled_channels
from bml.models.resnet12 import RESNET12_CHANNELS, ResNet12, ResNet12View
from bml.models.resnet18 import RESNET18_CHANNELS, ResNet18, ResNet18View

BACKBONE_CHANNELS = {"resnet12": RESNET12_CHANNELS, "resnet18": RESNET18_CHANNELS}
BACKBONE_ALIASES = {"resnet12": "resnet12", "res12": "resnet12", "resnet18": "resnet18", "res18": "resnet18"}


def canonical_backbone(name: str) -> str:
    """'resnet12' or 'resnet18' from any usual spelling ('Res12' and 'Res18' in released configs)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in BACKBONE_ALIASES:
        raise ValueError(f"unknown backbone {name!r}: expected one of 'resnet12' ('Res12'), 'resnet18' ('Res18')")
    return BACKBONE_ALIASES[key]


def backbone_channels(backbone: str, width: float = 1.0) -> tuple[int, ...]:
    """The four stage widths of ``backbone`` at ``width``; the last is the feature dimension."""
    return scaled_channels(BACKBONE_CHANNELS[canonical_backbone(backbone)], width)


def build_trunk(backbone: str, width: float = 1.0, drop_rate: float = 0.1) -> nn.Module:
    """Stages 1-3, shared by BML's two views."""
    channels = backbone_channels(backbone, width)[:3]
    if canonical_backbone(backbone) == "resnet12":
        return ResNet12(channels, drop_rate)
    return ResNet18(channels)


def build_view(backbone: str, width: float = 1.0, drop_rate: float = 0.1) -> nn.Module:
    """One view's own fourth stage, on top of the trunk."""
    channels = backbone_channels(backbone, width)
    if canonical_backbone(backbone) == "resnet12":
        return ResNet12View(channels[2], channels[3], drop_rate)
    return ResNet18View(channels[2], channels[3])


def build_encoder(backbone: str, width: float = 1.0, drop_rate: float = 0.1) -> nn.Module:
    """All four stages in one module (the baselines' single-view network)."""
    channels = backbone_channels(backbone, width)
    if canonical_backbone(backbone) == "resnet12":
        return ResNet12(channels, drop_rate)
    return ResNet18(channels)
