"""The paper's single-view baselines: the same backbone trained with a base-class classifier
(baseline-global) or episodically with prototypes (baseline-local)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bml.losses import global_position_loss, local_prototype_loss
from bml.models.backbones import backbone_channels, build_encoder, canonical_backbone
from bml.models.base import FewShotModel, backbone_settings, check_episode_batch, pooled, required_num_classes


class SingleViewModel(FewShotModel):
    """Four backbone stages (``encoder``); embeddings are the pooled D-dim features."""

    def __init__(self, width: float = 1.0, drop_rate: float = 0.1, backbone: str = "resnet12",
                 spatial: bool = False) -> None:
        super().__init__()
        self.backbone = canonical_backbone(backbone)
        self.spatial = spatial
        self.num_features = backbone_channels(self.backbone, width)[-1]
        self.encoder = build_encoder(self.backbone, width, drop_rate)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        """The single view's B x D x h x w feature map, as a 1-tuple like BML's pair."""
        return (self.encoder(images),)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        """Pooled features, B x D."""
        return (pooled(self.encoder(images)),)


class BaselineGlobal(SingleViewModel):
    """Backbone + linear classifier over base classes on the pooled feature, or with ``spatial``
    a 1x1 conv classifying every position (cross-entropy averaged over positions).

    The classifier is ``global_w`` with a Xavier-uniform weight, as in the original, so that the
    original code's baseline checkpoints load strictly."""

    view_names = ("global",)
    kind = "global"
    identifying_keys = ("global_w.weight",)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BaselineGlobal:
        common = backbone_settings(settings)
        return cls(required_num_classes(settings, cls.kind), spatial=bool(settings.get("spatial", False)), **common)

    @classmethod
    def settings_from_weights(cls, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The classifier's rows are the base classes; a 1x1 convolution (4-D weight) classifies every position."""
        classifier = weights["global_w.weight"]
        return {"num_classes": classifier.shape[0], "spatial": classifier.dim() == 4}

    def __init__(self, num_classes: int, width: float = 1.0, drop_rate: float = 0.1,
                 backbone: str = "resnet12", spatial: bool = False) -> None:
        super().__init__(width, drop_rate, backbone, spatial)
        self.num_classes = num_classes
        if spatial:
            self.global_w = nn.Conv2d(self.num_features, num_classes, kernel_size=1)
        else:
            self.global_w = nn.Linear(self.num_features, num_classes)
        nn.init.xavier_uniform_(self.global_w.weight)

    def losses(self, images: torch.Tensor, labels: torch.Tensor, **unused) -> dict[str, torch.Tensor]:
        """Cross-entropy against base-class labels; other keyword arguments are ignored."""
        feature_map = self.encoder(images)
        if self.spatial:
            loss = global_position_loss(self.global_w(feature_map), labels)
        else:
            loss = F.cross_entropy(self.global_w(pooled(feature_map)).float(), labels)
        return {"global": loss, "total": loss}


class BaselineLocal(SingleViewModel):
    """Backbone trained on episodes: prototypes and squared Euclidean distances on the pooled
    feature, or with ``spatial`` for every query position; no margin."""

    view_names = ("local",)
    kind = "local"
    identifying_keys = ()   # the encoder alone: weights that show no other kind

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BaselineLocal:
        return cls(spatial=bool(settings.get("spatial", False)), **backbone_settings(settings))

    def losses(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, way: int, shot: int, query: int,
               **unused) -> dict[str, torch.Tensor]:
        """Prototype loss of one shot-major episode; ``labels`` and other keyword arguments are
        ignored (episode labels follow from the order)."""
        check_episode_batch(images, way, shot, query)
        feature_map = self.encoder(images)
        if not self.spatial:
            feature_map = feature_map.mean(dim=(2, 3), keepdim=True)
        loss = local_prototype_loss(feature_map, way, shot, epoch=1, max_epoch=1, alpha_1=0.0, alpha_2=0.0)  # no margin
        return {"local": loss, "total": loss}
