"""What every model of the toolkit shares: view names, the DropBlock ramp counter, and what the models table
(`bml.models.MODELS`) asks of a model class: its kind, the keys that identify its checkpoints, how it is built
from settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from bml.models.backbones import DEFAULT_BACKBONE, Backbone, canonical_backbone
from bml.models.dropblock import DropBlock


def check_episode_batch(images: torch.Tensor, way: int, shot: int, query: int) -> None:
    """Fail early (shapes only, no device sync) when a batch is not one way x (shot + query) episode."""
    if images.shape[0] != way * (shot + query):
        raise ValueError(f"an episode of {way}-way {shot}-shot {query}-query needs {way * (shot + query)} "
                         f"images in shot-major order, got {images.shape[0]}")


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Average over positions: B x D x h x w -> B x D."""
    return feature_map.mean(dim=(2, 3))


def backbone_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``width`` (1.0), ``drop_rate`` (0.1) and the canonical ``backbone`` (resnet12) of build settings."""
    return {
        "width": float(settings.get("width") or 1.0),
        "drop_rate": float(settings.get("drop_rate", 0.1)),
        "backbone": canonical_backbone(settings.get("backbone") or DEFAULT_BACKBONE),
    }


def required_num_classes(settings: Mapping[str, Any], kind: str) -> int:
    """``num_classes`` of build settings, for a model with a base-class classifier."""
    if settings.get("num_classes") is None:
        raise ValueError(f"model {kind!r} needs num_classes (the number of base classes)")
    return int(settings["num_classes"])


class FewShotModel(nn.Module):
    """Base of BML and the baselines.

    ``forward`` returns one feature map per view, ``embed`` one (B, D) embedding per view, both
    in the order of ``view_names``; ``losses`` returns a dict of scalar tensors with 'total'.
    ``losses`` accepts and ignores keyword arguments it does not use, so that a trainer can call
    every model with the same arguments.
    """

    view_names: tuple[str, ...] = ()
    kind: ClassVar[str]
    """Its name in `bml.models.MODELS`, in build settings' ``model`` and in checkpoints' configs."""
    identifying_keys: ClassVar[tuple[str, ...]] = ()
    """State-dict key prefixes that its checkpoints all have: weights are of the kind whose prefixes they have,
    the one with the most when several fit (none: the kind of weights that show no other)."""
    trunk_prefix: ClassVar[str] = "encoder."
    """Where the backbone's first stages sit in its state dict (the backbone's signature key is read there)."""

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FewShotModel:
        """The model that build settings describe (`bml.models.build_model` documents the keys); here a model
        built from ``width``, ``drop_rate`` and ``backbone`` alone."""
        return cls(**backbone_settings(settings))

    @classmethod
    def last_stage_key(cls, backbone: Backbone) -> str:
        """The state-dict key of the first convolution of its fourth stage, whose output channels tell the width
        multiplier; here that of a four-stage encoder at `trunk_prefix`."""
        return cls.trunk_prefix + backbone.encoder_last_stage_key

    @classmethod
    def settings_from_weights(cls, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``num_classes`` and ``spatial`` as its state dict shows them (none and False: no classifier)."""
        return {"num_classes": None, "spatial": False}

    def __init__(self) -> None:
        super().__init__()
        self._dropblock_step = 0

    def dropblocks(self) -> list[DropBlock]:
        return [m for m in self.modules() if isinstance(m, DropBlock)]

    @property
    def dropblock_step(self) -> int:
        """DropBlock ramp counter t: advanced by each training-mode forward.

        A trainer sets it to its count for the global step (`--dropblock_counter`) before each
        episode's forward, so that all the episodes of one optimiser step see the same t, and
        saves it in its checkpoints (it is not in the state dict). Models without DropBlock
        (ResNet-18) just keep the value."""
        blocks = self.dropblocks()
        return blocks[0].step if blocks else self._dropblock_step

    @dropblock_step.setter
    def dropblock_step(self, step: int) -> None:
        self._dropblock_step = int(step)
        for block in self.dropblocks():
            block.step = int(step)
