"""The one checkpoint reader and writer: atomic saves, safe loads, strict architecture checks.

A checkpoint is ``{'model': state_dict, 'max_accuracy', 'epoch', 'config': argparse.Namespace}``
(the released format); training checkpoints add optimizer, scaler, RNG and step entries
(`bml.training.state` writes them and resumes a run from them). This module is all that inference needs:
it never imports training.
Loading never unpickles arbitrary objects: tensors, containers, scalars and
``argparse.Namespace`` only (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import errno
import io
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bml.models import MODELS, FewShotModel, build_model, recognised_model
from bml.models.backbones import BACKBONES, canonical_backbone, recognised_backbone
from bml.utils.io import OutputError, atomic_write, disk_full_error, not_regular_file
from bml.utils.messages import warn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that DistributedDataParallel and torch.compile add to state-dict keys."""
CONFIG_PASSTHROUGH = ("dataset", "image_size", "transform")
RELEASED_WEIGHTS_HINT = ("The authors' released weights (ResNet-12, one file per data set) are linked in the README's "
                         "'Released weights' section and in pretrained_weights/README.md: download one into "
                         "pretrained_weights/ (e.g. pretrained_weights/miniImageNet.pth), or train your own (bash "
                         "train_bml.sh writes output/<run>/best.pth)")
"""Where a checkpoint comes from, for the error a missing one gives."""
MISMATCH_KEYS_SHOWN = 5
"""Keys named per kind of mismatch (missing, unexpected, mis-shaped); the rest are counted."""


TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")
"""How torch's zip writer words a write that failed (its ENOSPC becomes a RuntimeError with these)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not match the model it describes."""


class _ByteCounter(io.RawIOBase):
    """A write-only sink that only counts: the size of a checkpoint without writing it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash mid-save never leaves a truncated checkpoint behind. A full disk raises OutputError
    naming the folder and the checkpoint's size; the previous ``path`` is kept. torch's zip writer reports a
    write that failed part-way (a disk filling up) as a RuntimeError of its own, translated here too."""
    try:
        with atomic_write(path) as handle:
            try:
                torch.save(dict(state), handle)
            except RuntimeError as error:
                if not any(marker in str(error) for marker in TORCH_WRITE_FAILURES):
                    raise
                raise OSError(errno.ENOSPC, f"torch could not write the file: {str(error).splitlines()[0]}") from error
    except OutputError as error:
        if error.errno != errno.ENOSPC:
            raise
        counter = _ByteCounter()
        torch.save(dict(state), counter)
        raise disk_full_error(Path(path), counter.count) from error


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable torch checkpoint (truncated, corrupt, or not written by "
                           f"torch.save): {type(error).__name__}")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``, ``argparse.Namespace`` allowed.

    Raises FileNotFoundError for a missing file, and CheckpointError for a file holding any
    other pickled object (which is refused, never executed) or one that is not a torch checkpoint.
    """
    path = Path(path)
    if problem := not_regular_file(path):
        raise CheckpointError(f"{problem}: give the path of a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. {RELEASED_WEIGHTS_HINT}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):   # a refused global is named so by torch; anything else is damage
            raise _unreadable(path, error) from error
        raise CheckpointError(
            f"refused to load {path}: it holds pickled objects other than tensors, containers, scalars "
            f"and argparse.Namespace, and unpickling them could run arbitrary code. Load it with "
            f"torch.load(weights_only=False) only if you trust its source. Details: {error}"
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise _unreadable(path, error) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def model_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (or of a bare state dict), wrapper prefixes removed."""
    weights = state["model"] if "model" in state else state
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError("checkpoint has no 'model' state dict of tensors")
    return {strip_wrapper_prefixes(key): value for key, value in weights.items()}


def strip_wrapper_prefixes(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def model_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """Settings for ``build_model`` (plus dataset/image_size/transform when recorded).

    Taken from the checkpoint's config where it has them, otherwise inferred from the weights
    (`infer_model_config`). Released configs are the original's Namespace: 'Res12'/'Res18' backbones, no width.
    """
    settings = config_settings(state)
    weights = model_state_dict(state)
    inferred = infer_model_config(weights)
    kind = settings.get("model") if settings.get("model") in MODELS else inferred["model"]
    try:
        backbone = canonical_backbone(checked_setting(settings, "backbone", str) or inferred["backbone"])
    except ValueError as error:
        raise CheckpointError(f"the checkpoint's config: {error}") from None
    result = {
        "model": kind,
        "backbone": backbone,
        "width": float(checked_setting(settings, "width", float, minimum=0) or inferred["width"]),
        "num_classes": checked_setting(settings, "num_classes", int, minimum=0) or inferred["num_classes"],
        "spatial": bool(settings.get("spatial", inferred["spatial"])),
        "drop_rate": float(0.1 if settings.get("drop_rate") is None else checked_setting(settings, "drop_rate", float)),
    }
    checked_setting(settings, "image_size", int, minimum=0)
    for key in ("dataset", "transform"):
        checked_setting(settings, key, str)
    result.update({key: settings[key] for key in CONFIG_PASSTHROUGH if settings.get(key) is not None})
    return result


def config_settings(state: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's `config` as a dict (a Namespace, a dict, or none); CheckpointError for anything else."""
    config = state.get("config")
    if config is None:
        return {}
    if not isinstance(config, (argparse.Namespace, Mapping)):
        raise CheckpointError(f"the checkpoint's 'config' is a {type(config).__name__}, not the settings of a run "
                              "(an argparse.Namespace or a dict): restore the file, or delete its 'config' entry")
    return dict(vars(config) if isinstance(config, argparse.Namespace) else config)


def checked_setting(settings: Mapping[str, Any], key: str, kind: type, minimum: float | None = None) -> Any:
    """`settings[key]` (None when absent) when it is a `kind` (an int for float too; never a bool) above
    `minimum`; CheckpointError naming the field otherwise."""
    value = settings.get(key)
    if value is None:
        return None
    allowed = (int, float) if kind is float else kind
    numeric = kind in (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or \
            (numeric and not (math.isfinite(value) and (minimum is None or value > minimum) and value < 2**31)):
        bound = f" > {minimum:g}" if minimum is not None else ""
        raise CheckpointError(f"the checkpoint's config has {key} = {value!r:.80}, not a {kind.__name__}{bound}: "
                              "the file was edited or damaged; restore it, or delete that entry")
    return value


def infer_model_config(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Model kind, backbone, width, num_classes and spatial read from state-dict keys and shapes, as the tables say:
    the kind whose identifying keys the weights have (`bml.models.MODELS`), the backbone whose signature key its
    trunk has (`bml.models.backbones.BACKBONES`), the width from its fourth stage's channels (where the weights
    lack it, from any kind's fourth stage they have), num_classes and spatial from its classifier."""
    model = recognised_model(weights)
    backbone = recognised_backbone(weights, model.trunk_prefix)
    stage_keys = [kind.last_stage_key(BACKBONES[backbone]) for kind in (model, *MODELS.values())]
    last_stage = next((key for key in stage_keys if key in weights), None)
    width = weights[last_stage].shape[0] / BACKBONES[backbone].channels[-1] if last_stage else 1.0
    return {"model": model.kind, "backbone": backbone, "width": width, **model.settings_from_weights(weights)}


def check_state_dict(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointError counting the missing, unexpected and mis-shaped keys, naming the first few of each."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(weights[key].shape)}, model {tuple(expected[key].shape)}"
        for key in set(expected) & set(weights)
        if weights[key].shape != expected[key].shape
    )
    if missing or unexpected or misshaped:
        lines = [f"checkpoint does not match {type(model).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                more = f", ... and {len(keys) - MISMATCH_KEYS_SHOWN} more" if len(keys) > MISMATCH_KEYS_SHOWN else ""
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:MISMATCH_KEYS_SHOWN]) + more)
        raise CheckpointError("\n".join(lines))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> FewShotModel:
    """A released or own checkpoint -> the right model with all its weights, in eval mode.

    The architecture comes from ``model_config``; keys and shapes must match exactly, so a
    half-loaded model is never returned.
    """
    return model_from_state(read_checkpoint(path), device, source=str(path))


def model_from_state(state: Mapping[str, Any], device: str | torch.device = "cpu",
                     source: str = "the checkpoint") -> FewShotModel:
    """``load_model`` for a checkpoint already read with ``read_checkpoint`` (no second read)."""
    weights = model_state_dict(state)
    try:
        model = build_model(model_config(state))
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"cannot build a model for {source}: {error}") from error
    check_state_dict(model, weights)
    model.load_state_dict(weights, strict=True)
    model.dropblock_step = checked_counter(state, "dropblock_step")
    return model.to(device).eval()


def checked_counter(state: Mapping[str, Any], key: str, default: int = 0) -> int:
    """A step counter of a checkpoint (`dropblock_step`, `step`): a non-negative int, else CheckpointError."""
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"the checkpoint's '{key}' is {value!r:.80}, not a step count (an integer >= 0): the "
                              "file was edited or damaged; restore it, or delete that entry")
    return value


CALIBRATION_KEY = "calibration"
"""Checkpoint entry of `bml.calibration`'s record: {'temperatures': {vote: T}, how they were fitted, ...}."""


TEMPERATURE_RANGE = (1e-4, 1e6)
"""The temperatures a checkpoint's calibration may hold: beyond them softmax(logits / T) is uniform or
overflows to NaN for any logits a model makes; the fitted ones lie far inside."""


def temperature_problem(value: Any) -> str | None:
    """Why `value` is not a usable temperature (None when it is a float within `TEMPERATURE_RANGE`)."""
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r:.40} is not a number"
    if not low <= value <= high:   # also NaN and inf
        return f"{value!r} is outside {low:g}..{high:g}"
    return None


def read_calibration(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's calibration record, or None when it was never calibrated.

    A temperature that is not a number in `TEMPERATURE_RANGE` is left out with a warning (that vote is then
    uncalibrated); raises CheckpointError when the record itself is not one `bml.calibration` writes.
    """
    record = state.get(CALIBRATION_KEY)
    if record is None:
        return None
    temperatures = record.get("temperatures") if isinstance(record, Mapping) else None
    if not isinstance(temperatures, Mapping):
        raise CheckpointError(f"the checkpoint's '{CALIBRATION_KEY}' entry has no temperatures "
                              f"({record!r:.200}): recalibrate it with eval_bml.py --calibrate")
    problems = {vote: problem for vote, value in temperatures.items() if (problem := temperature_problem(value))}
    if problems:
        warn(f"the checkpoint's temperatures of {', '.join(f'{vote} ({problem})' for vote, problem in problems.items())} "
             f"are ignored, their confidences uncalibrated: recalibrate it with eval_bml.py --calibrate")
    return {**record, "temperatures": {vote: float(value) for vote, value in temperatures.items()
                                       if vote not in problems}}


def with_calibration(state: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the checkpoint `state` carrying the calibration `record` (an earlier one replaced)."""
    return {**state, CALIBRATION_KEY: dict(record)}
