"""Models: BML (the paper's model; docs/ARCHITECTURE.md "Models"), the two single-view baselines, the models
table `MODELS`, and ``build_model``, the one way to build any of them from settings.

A new kind of model is a `FewShotModel` subclass that names its ``kind`` and ``identifying_keys`` (and, where
the defaults do not fit, how it is built from settings and what its weights show), plus one entry in `MODELS`:
`build_model` and the checkpoint reader (`bml.checkpoint.model_config`) read it from there.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import torch

from bml.models.base import FewShotModel
from bml.models.baselines import BaselineGlobal, BaselineLocal
from bml.models.bml import BML

MODELS: dict[str, type[FewShotModel]] = {model.kind: model for model in (BML, BaselineGlobal, BaselineLocal)}
DEFAULT_MODEL = BML.kind
MODEL_KINDS = tuple(MODELS)
"""The kinds of `MODELS` at import (read `MODELS` itself)."""

__all__ = ["BML", "DEFAULT_MODEL", "MODELS", "MODEL_KINDS", "BaselineGlobal", "BaselineLocal", "FewShotModel",
           "build_model", "recognised_model"]


def build_model(config: Mapping[str, Any] | Namespace) -> FewShotModel:
    """Build a model from a dict or argparse Namespace.

    Keys: ``model`` ('bml', default, | 'global' | 'local'), ``backbone`` ('resnet12', default,
    | 'resnet18'; released configs' 'Res12' / 'Res18' accepted), ``width`` (1.0), ``drop_rate``
    (0.1), ``num_classes`` (required for 'bml' and 'global'), ``spatial`` (False, baselines).
    Other keys are ignored.
    """
    settings = vars(config) if isinstance(config, Namespace) else dict(config)
    kind = settings.get("model") or DEFAULT_MODEL
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}: expected one of {', '.join(MODELS)}")
    return MODELS[kind].from_settings(settings)


def recognised_model(weights: Mapping[str, torch.Tensor]) -> type[FewShotModel]:
    """The class of `MODELS` whose identifying keys the state dict has the most of (ties: the first in `MODELS`);
    a class is a candidate only when the state dict has all of its identifying keys."""
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in weights)

    candidates = [model for model in MODELS.values() if all(has(prefix) for prefix in model.identifying_keys)]
    if not candidates:
        raise ValueError(f"the weights have the identifying keys of none of the model kinds ({', '.join(MODELS)}): "
                         "load a checkpoint of one of them")
    return max(candidates, key=lambda model: len(model.identifying_keys))
