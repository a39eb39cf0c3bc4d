"""Binocular Mutual Learning (the paper; docs/ARCHITECTURE.md "Models"): a shared trunk with a global and a
local view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bml.losses import global_position_loss, local_prototype_loss, mutual_kl_loss
from bml.models.backbones import Backbone, backbone_channels, build_trunk, build_view, canonical_backbone
from bml.models.base import FewShotModel, backbone_settings, check_episode_batch, pooled, required_num_classes


class BML(FewShotModel):
    """Shared stages 1-3 (``encoder``), two private fourth stages (``global_view``, ``local_view``)
    and the global view's 1x1-conv classifier over base classes (``global_w``).

    The global view learns the whole base-class space, the local view episodic prototypes with
    an elastic margin, and each view learns from the other through a mutual KL on pooled
    features. State-dict keys equal the released checkpoints'.
    """

    view_names = ("global", "local")
    kind = "bml"
    identifying_keys = ("global_w.weight", "global_view.")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BML:
        common = backbone_settings(settings)
        return cls(required_num_classes(settings, cls.kind), **common)

    @classmethod
    def last_stage_key(cls, backbone: Backbone) -> str:
        return "global_view." + backbone.view_last_stage_key

    @classmethod
    def settings_from_weights(cls, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The classifier's rows are the base classes (it is always a 1x1 convolution: no ``spatial`` setting)."""
        return {"num_classes": weights["global_w.weight"].shape[0], "spatial": False}

    def __init__(self, num_classes: int, width: float = 1.0, drop_rate: float = 0.1,
                 backbone: str = "resnet12") -> None:
        super().__init__()
        self.backbone = canonical_backbone(backbone)
        self.num_classes = num_classes
        self.num_features = backbone_channels(self.backbone, width)[-1]
        self.encoder = build_trunk(self.backbone, width, drop_rate)
        self.global_view = build_view(self.backbone, width, drop_rate)
        self.local_view = build_view(self.backbone, width, drop_rate)
        self.global_w = nn.Conv2d(self.num_features, num_classes, kernel_size=1)
        nn.init.xavier_uniform_(self.global_w.weight)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global and local views' B x D x h x w feature maps."""
        shared = self.encoder(images)
        return self.global_view(shared), self.local_view(shared)

    def losses(self, images: torch.Tensor, base_labels: torch.Tensor, *, way: int, shot: int, query: int,
               epoch: int | torch.Tensor, max_epoch: int, alpha_1: float, alpha_2: float, T: float,
               weights: tuple[float, float, float], global_batch: int = 0, **unused) -> dict[str, torch.Tensor]:
        """The three loss terms of one shot-major episode and their weighted sum 'total'.

        ``base_labels`` are the images' base-class labels (for the global view); the local view
        uses the episode labels implied by the shot-major order. Epochs count from 1.
        ``global_batch`` images may follow the episode (e.g. a shuffled batch, our extension for
        base-class spaces far larger than an episode; 0 as published): only the global and the
        mutual terms see them. The loss settings have no defaults here: the published ones are stated
        once, in `bml.recipes` (`BML_LOSSES.model_settings()`; the episode shape in `Recipe`).
        """
        episode_size = images.shape[0] - global_batch
        check_episode_batch(images[:episode_size], way, shot, query)
        global_map, local_map = self(images)
        terms = {
            "global": global_position_loss(self.global_w(global_map), base_labels),
            "local": local_prototype_loss(local_map[:episode_size], way, shot, epoch, max_epoch, alpha_1, alpha_2),
            "mutual": mutual_kl_loss(pooled(global_map), pooled(local_map), T),
        }
        terms["total"] = sum(w * terms[name] for w, name in zip(weights, ("global", "local", "mutual")))
        return terms

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation embeddings (as in the released code): sqrt(relu(F)) of each view, flattened to B x (D*h*w)."""
        return tuple(torch.relu(feature_map).sqrt().flatten(1) for feature_map in self(images))
