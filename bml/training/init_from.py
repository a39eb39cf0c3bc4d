"""Fine-tuning: a new run that starts from a trained checkpoint's trunk and views (`--init_from`).

The base-class classifier (`global_w`) is never taken over: its rows are the old training classes, and a
new run trains on other ones, so it is initialised afresh, sized to the new training split. Everything else
must match the checkpoint exactly (same model kind, backbone and width); the run's settings take the
checkpoint's architecture where the command line does not give one (`checkpoint_architecture`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bml.checkpoint import CheckpointError, model_config, model_state_dict, read_checkpoint
from bml.models import build_model

CLASSIFIER_PREFIX = "global_w."
"""State-dict prefix of the base-class classifier (BML, baseline-global): always initialised afresh."""
ARCHITECTURE_KEYS = ("backbone", "width")
"""Settings of the run that must equal the checkpoint's for its weights to load."""


@dataclass(frozen=True)
class InitReport:
    """What `--init_from` takes from the checkpoint and what the run initialises."""

    checkpoint: str
    loaded: dict[str, int]        # top-level module -> tensors loaded
    initialised: list[str]        # what starts from a fresh initialisation

    def as_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "loaded": self.loaded, "initialised": self.initialised}

    def describe(self) -> str:
        loaded = ", ".join(f"{module} ({count} tensors)" for module, count in self.loaded.items())
        return f"Initialised from {self.checkpoint}: loaded {loaded}; new: {', '.join(self.initialised)}"


def read_init_checkpoint(path: str | Path) -> dict:
    """The checkpoint `--init_from` names, read safely; a missing file says which flag named it."""
    try:
        return read_checkpoint(path)
    except FileNotFoundError:
        raise CheckpointError(f"--init_from {path}: no such checkpoint (a released one, e.g. the miniImageNet "
                              "weights of pretrained_weights/, or a run's best.pth)") from None


def checkpoint_architecture(path: str | Path) -> dict:
    """The model kind, backbone and width of the checkpoint at `path` (`bml.checkpoint.model_config`)."""
    config = model_config(read_init_checkpoint(path))
    return {key: config[key] for key in ("model", *ARCHITECTURE_KEYS)}


def _module(key: str) -> str:
    return key.split(".", 1)[0]


def init_report(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str,
                classes: str | None = None) -> InitReport:
    """Which of `model`'s tensors come from `weights` (all but the classifier, which must all match) and
    which are new (`classes`: how the report names the training classes; default: their number). Raises
    CheckpointError naming the flags to change when the trunk or views do not match."""
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith(CLASSIFIER_PREFIX)}
    missing = sorted(key for key in expected if key not in weights)
    misshaped = sorted(key for key in expected if key in weights and weights[key].shape != expected[key].shape)
    if missing or misshaped:
        first = (missing + misshaped)[0]
        raise CheckpointError(f"--init_from {source}: its weights do not fit this run's {type(model).__name__} "
                              f"({len(missing)} missing, {len(misshaped)} mis-shaped, e.g. {first}): leave out "
                              "--backbone and --width (the checkpoint's are used), and train the same model as the "
                              "checkpoint (train_bml.py for BML, train_baseline.py --mode for a baseline)")
    loaded: dict[str, int] = {}
    for key in expected:
        loaded[_module(key)] = loaded.get(_module(key), 0) + 1
    classifier = [key for key in model.state_dict() if key.startswith(CLASSIFIER_PREFIX)]
    classes = classes or f"the {getattr(model, 'num_classes', None)} training classes"
    initialised = [f"{CLASSIFIER_PREFIX.rstrip('.')} (a new classifier over {classes})"] if classifier else []
    return InitReport(source, loaded, initialised or ["nothing (the model has no base-class classifier)"])


def load_init_weights(model: nn.Module, path: str | Path) -> InitReport:
    """Copy the checkpoint's trunk and views into `model` (in place); its classifier stays as initialised."""
    weights = model_state_dict(read_init_checkpoint(path))
    report = init_report(model, weights, str(path))
    kept = {key: value for key, value in weights.items() if not key.startswith(CLASSIFIER_PREFIX)
            and key in model.state_dict()}
    model.load_state_dict(kept, strict=False)
    return report


def planned_init(settings: Mapping, path: str | Path) -> InitReport:
    """The report `load_init_weights` would give, without data: the model built with a stand-in class count."""
    model = build_model({**settings, "num_classes": settings.get("num_classes") or 2})
    return init_report(model, model_state_dict(read_init_checkpoint(path)), str(path),
                       classes="the training split's classes")
