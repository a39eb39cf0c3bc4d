"""Models: BML (the paper's model; docs/ARCHITECTURE.md "Models"), the two single-view baselines, and
``build_model``, the one way to build any of them from settings."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from bml.models.backbones import canonical_backbone
from bml.models.base import FewShotModel
from bml.models.baselines import BaselineGlobal, BaselineLocal
from bml.models.bml import BML

MODEL_KINDS = ("bml", "global", "local")

__all__ = ["BML", "MODEL_KINDS", "BaselineGlobal", "BaselineLocal", "FewShotModel", "build_model"]


def build_model(config: Mapping[str, Any] | Namespace) -> FewShotModel:
    """Build a model from a dict or argparse Namespace.

    Keys: ``model`` ('bml', default, | 'global' | 'local'), ``backbone`` ('resnet12', default,
    | 'resnet18'; released configs' 'Res12' / 'Res18' accepted), ``width`` (1.0), ``drop_rate``
    (0.1), ``num_classes`` (required for 'bml' and 'global'), ``spatial`` (False, baselines).
    Other keys are ignored.
    """
    settings = vars(config) if isinstance(config, Namespace) else dict(config)
    kind = settings.get("model") or "bml"
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r}: expected one of {', '.join(MODEL_KINDS)}")
    common = {
        "width": float(settings.get("width") or 1.0),
        "drop_rate": float(settings.get("drop_rate", 0.1)),
        "backbone": canonical_backbone(settings.get("backbone") or "resnet12"),
    }
    if kind == "local":
        return BaselineLocal(spatial=bool(settings.get("spatial", False)), **common)
    if settings.get("num_classes") is None:
        raise ValueError(f"model {kind!r} needs num_classes (the number of base classes)")
    if kind == "global":
        return BaselineGlobal(int(settings["num_classes"]), spatial=bool(settings.get("spatial", False)), **common)
    return BML(int(settings["num_classes"]), **common)
