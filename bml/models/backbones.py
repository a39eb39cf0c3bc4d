"""The backbones table: per backbone, its stage widths, how its parts are built, and how a checkpoint shows it.

A new backbone is one `Backbone` entry in `BACKBONES`: the models, `build_model`, the checkpoint reader
(`bml.checkpoint.model_config`) and the `--backbone` choices (`backbone_flag_choices`) all read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from bml.models.layers import scaled_channels
from bml.models.resnet12 import RESNET12_CHANNELS, ResNet12, ResNet12View
from bml.models.resnet18 import RESNET18_CHANNELS, ResNet18, ResNet18View


@dataclass(frozen=True)
class Backbone:
    """One backbone. Builders take widths already scaled by the width multiplier, and the drop rate
    (which backbones without dropout ignore). State-dict keys are relative to the module they name."""

    channels: tuple[int, int, int, int]
    """The four stage widths at width 1.0; the last is the feature dimension."""
    trunk: Callable[[tuple[int, ...], float], nn.Module]
    """(widths of stages 1-3, drop rate) -> stages 1-3, shared by BML's two views."""
    view: Callable[[int, int, float], nn.Module]
    """(input channels, output channels, drop rate) -> one view's own fourth stage, on top of the trunk."""
    encoder: Callable[[tuple[int, ...], float], nn.Module]
    """(the four widths, drop rate) -> all four stages in one module (the baselines' network)."""
    flag_name: str
    """What the `--backbone` flag offers for it (the released code's names); accepted everywhere, in any case."""
    signature_key: str
    """A key that only this backbone's trunk (and encoder) has: it tells a checkpoint's backbone."""
    view_last_stage_key: str
    """First convolution of a view's fourth stage, whose output channels give the width multiplier."""
    encoder_last_stage_key: str
    """The same convolution in the encoder."""


BACKBONES: dict[str, Backbone] = {
    "resnet12": Backbone(
        channels=RESNET12_CHANNELS,
        trunk=lambda channels, drop_rate: ResNet12(channels, drop_rate),
        view=lambda in_channels, out_channels, drop_rate: ResNet12View(in_channels, out_channels, drop_rate),
        encoder=lambda channels, drop_rate: ResNet12(channels, drop_rate),
        flag_name="Res12",
        signature_key="layer1.0.conv3.weight",            # three convolutions per block
        view_last_stage_key="layer.0.conv1.weight",
        encoder_last_stage_key="layer4.0.conv1.weight",
    ),
    "resnet18": Backbone(
        channels=RESNET18_CHANNELS,
        trunk=lambda channels, drop_rate: ResNet18(channels),
        view=lambda in_channels, out_channels, drop_rate: ResNet18View(in_channels, out_channels),
        encoder=lambda channels, drop_rate: ResNet18(channels),
        flag_name="Res18",
        signature_key="conv1.weight",                     # the stem
        view_last_stage_key="layer4.0.conv1.weight",
        encoder_last_stage_key="layer4.0.conv1.weight",
    ),
}
DEFAULT_BACKBONE = "resnet12"
"""The paper's backbone: what settings without a backbone, and weights that show none, get."""
BACKBONE_CHANNELS = {name: backbone.channels for name, backbone in BACKBONES.items()}
"""Stage widths per backbone, as `BACKBONES` had them at import (read `BACKBONES` itself)."""


def _spelling(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def canonical_backbone(name: str) -> str:
    """The name in `BACKBONES` from any usual spelling ('Res12' and 'Res18' in released configs)."""
    for canonical, backbone in BACKBONES.items():
        if _spelling(name) in (_spelling(canonical), _spelling(backbone.flag_name)):
            return canonical
    expected = ", ".join(f"'{canonical}' ('{backbone.flag_name}')" for canonical, backbone in BACKBONES.items())
    raise ValueError(f"unknown backbone {name!r}: expected one of {expected}")


def backbone_flag_choices() -> tuple[str, ...]:
    """The choices of the `--backbone` flag: 'Res12', 'Res18' (the released code's names), one per backbone."""
    return tuple(backbone.flag_name for backbone in BACKBONES.values())


def backbone_spec(name: str) -> Backbone:
    """The `BACKBONES` entry of `name`, in any spelling `canonical_backbone` accepts."""
    return BACKBONES[canonical_backbone(name)]


def recognised_backbone(weights: Mapping[str, torch.Tensor], prefix: str) -> str:
    """The backbone whose signature key the state dict has under `prefix` (where a model keeps its trunk);
    `DEFAULT_BACKBONE` when none has (a strict load then names the keys that do not fit)."""
    return next((name for name, backbone in BACKBONES.items() if prefix + backbone.signature_key in weights),
                DEFAULT_BACKBONE)


def backbone_channels(backbone: str, width: float = 1.0) -> tuple[int, ...]:
    """The four stage widths of ``backbone`` at ``width``; the last is the feature dimension."""
    return scaled_channels(backbone_spec(backbone).channels, width)


def build_trunk(backbone: str, width: float = 1.0, drop_rate: float = 0.1) -> nn.Module:
    """Stages 1-3, shared by BML's two views."""
    return backbone_spec(backbone).trunk(backbone_channels(backbone, width)[:3], drop_rate)


def build_view(backbone: str, width: float = 1.0, drop_rate: float = 0.1) -> nn.Module:
    """One view's own fourth stage, on top of the trunk."""
    channels = backbone_channels(backbone, width)
    return backbone_spec(backbone).view(channels[2], channels[3], drop_rate)


def build_encoder(backbone: str, width: float = 1.0, drop_rate: float = 0.1) -> nn.Module:
    """All four stages in one module (the baselines' single-view network)."""
    return backbone_spec(backbone).encoder(backbone_channels(backbone, width), drop_rate)
