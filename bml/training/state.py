"""A training run's state: its counters (`TrainingState`), what a step needs (`TrainComponents`), and the
training checkpoint that holds both: the released format plus what an exact resume needs
(`checkpoint_state` writes it, `resume` restores a run from it). Reading and writing files, and loading a
model for inference, are `bml.checkpoint`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bml.checkpoint import (CheckpointError, check_state_dict, checked_counter, config_settings, model_state_dict,
                            read_checkpoint)
from bml.training.step_plan import training_steps
from bml.utils import distributed
from bml.utils.rng import capture_rng_state, restore_rng_state


@dataclass
class TrainingState:
    """Counters saved with every checkpoint, so that a resumed run continues where it stopped."""

    epoch: int = 0            # completed epochs
    epoch_step: int = 0       # optimiser steps done in epoch `epoch + 1` (0 at an epoch boundary)
    step: int = 0             # optimiser steps since the start; drives the DropBlock ramp
    max_accuracy: float = 0.0
    best_epoch: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)  # running sums of the current epoch
    initial_weight_norm: float = 0.0   # norm of the weights at the start: the reference for divergence


@dataclass
class TrainComponents:
    """What an optimiser step needs.

    `loss_module(images, labels, settings)` returns the model's loss dict; it is the DDP- and/or
    compile-wrapped module whose forward is `model.losses`. `ddp` is the DDP wrapper itself (for
    `no_sync` while accumulating), None in a single process.
    """

    model: nn.Module
    loss_module: Callable[..., dict[str, torch.Tensor]]
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    clip_grad: float = 0.0    # max norm of all the gradients of a step together; 0: no clipping
    # The DropBlock counter of each global step (`bml.training.step_plan.dropblock_counter`); default: the step.
    dropblock_count: Callable[[int], int] = training_steps



def checkpoint_state(args: argparse.Namespace, parts: TrainComponents, state: TrainingState) -> dict:
    """The released format (model, max_accuracy, epoch, config) plus what an exact resume needs.

    Collective under DDP (every process contributes its RNG state): call it on all processes.
    """
    rng_states = distributed.all_gather_objects(capture_rng_state())
    return {
        "model": parts.model.state_dict(),
        "max_accuracy": float(state.max_accuracy),
        "epoch": int(state.epoch),
        "config": argparse.Namespace(**vars(args)),
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "scheduler": {"base_lr": args.lr, "milestones": list(args.lr_milestones), "gammas": list(args.lr_gammas),
                      "lr": parts.optimizer.param_groups[0]["lr"]},
        "rng": rng_states,
        "dropblock_step": int(parts.dropblock_count(state.step)),
        "step": int(state.step),
        "training_state": asdict(state),
    }


RUN_ONLY_SETTINGS = ("save_folder", "is_continue", "dry_run", "data_root", "num_workers", "print_freq", "save_freq")
"""Settings that do not shape what is trained (where the run and its data are, how often it prints and saves, how
many loader workers draw the same episodes): every other one a run records is compared on resume."""


def changed_settings(saved: dict, args: argparse.Namespace) -> list[str]:
    """'name saved -> now' for every setting both record that shapes training and differs (`RUN_ONLY_SETTINGS`
    aside): derived from the recorded settings, so that a new flag is compared without being listed."""
    now = vars(args)
    return [f"{key} {saved[key]!r} -> {now[key]!r}" for key in sorted(saved.keys() & now.keys())
            if key not in RUN_ONLY_SETTINGS and saved[key] != now[key]]


def check_counters(args: argparse.Namespace, state: TrainingState, saved: dict, steps: int, path: Path) -> None:
    """Counters this run's settings cannot continue from: refused before the run writes anything."""
    if state.epoch_step > steps:
        raise CheckpointError(
            f"{path} stopped after step {state.epoch_step} of epoch {state.epoch + 1}, but an epoch now has {steps} "
            f"steps: resume with the settings it ran with (--episodes_per_epoch {saved.get('episodes_per_epoch')}, "
            f"--episodes_per_step {saved.get('episodes_per_step')})")
    if state.epoch > args.epochs or (state.epoch == args.epochs and state.epoch_step):
        into = state.epoch + (1 if state.epoch_step else 0)
        raise CheckpointError(f"{path} is in epoch {into}, past --epochs {args.epochs}: nothing would be trained. "
                              f"Pass --epochs {max(into, int(saved.get('epochs') or 0))} or more to continue it")


def resume(args: argparse.Namespace, parts: TrainComponents, path: Path, steps: int
           ) -> tuple[TrainingState, list | None, list[str]]:
    """Load `path` into the model, optimiser and scaler; return the counters, the saved RNG states and
    the warnings (settings of `args` that differ from the checkpoint's, each named). `steps`: optimiser steps per
    epoch of this run.

    Raises CheckpointError, saying what to do, for anything that cannot be resumed exactly.
    """
    checkpoint = read_checkpoint(path)
    missing = [key for key in ("optimizer", "training_state") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it holds weights only (no {' or '.join(missing)}), like a "
                              "released checkpoint. --is_continue continues a run this project's training wrote; "
                              "move the file away (or choose another --run_folder) to start afresh")
    saved = config_settings(checkpoint)
    state = restore_training_state(checkpoint["training_state"], path)
    check_counters(args, state, saved, steps, path)
    weights = model_state_dict(checkpoint)
    check_state_dict(parts.model, weights)
    non_finite = [key for key, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if non_finite:
        raise CheckpointError(f"{path} holds non-finite weights ({len(non_finite)} tensors, e.g. {non_finite[0]}): "
                              "it cannot be resumed. Copy an earlier epoch_<N>.pth over it, or delete the folder to "
                              "start afresh")
    rng = checkpoint.get("rng")
    if rng is not None and not (isinstance(rng, list) and rng and all(isinstance(part, dict) for part in rng)):
        raise CheckpointError(f"the 'rng' of {path} is not the random states a training run saves (one dict per "
                              "process): restore the file, or delete its 'rng' entry to continue with reseeded streams")
    checked_counter(checkpoint, "step")
    parts.model.load_state_dict(weights, strict=True)
    load_optimizer_state(parts.optimizer, checkpoint["optimizer"], path)
    if checkpoint.get("scaler"):
        try:
            parts.scaler.load_state_dict(checkpoint["scaler"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"the gradient scaler state in {path} is damaged ({error}): restore the file") from None
    parts.model.dropblock_step = checked_counter(checkpoint, "dropblock_step", state.step)
    changed = changed_settings(saved, args)
    warnings = [("resuming with settings that differ from the checkpoint's (the run will not match an "
                 "uninterrupted one): " + ", ".join(changed))] if changed else []
    return state, checkpoint.get("rng"), warnings


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, path: Path) -> None:
    """`optimizer.load_state_dict`, refusing a state saved for other parameters (torch does not compare
    the buffers' shapes, and a mismatch would only fail at the first step)."""
    mismatch = "it was saved for another model or optimiser (see --optim)"
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as error:
        raise CheckpointError(f"the optimiser state in {path} does not fit this run: {mismatch} ({error})") from None
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for name, value in optimizer.state.get(parameter, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != parameter.shape:
                    raise CheckpointError(f"the optimiser state in {path} does not fit this run: {mismatch} ({name} "
                                          f"{tuple(value.shape)} for a parameter {tuple(parameter.shape)})")


def restore_saved_rng(saved: dict, path: Path) -> None:
    """`restore_rng_state`, a damaged state a CheckpointError."""
    try:
        restore_rng_state(saved)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise CheckpointError(f"the 'rng' of {path} is damaged ({type(error).__name__}: {error}): restore the file, or "
                              "delete its 'rng' entry to continue with reseeded streams") from None


def restore_training_state(saved: object, path: Path) -> TrainingState:
    """The counters of a checkpoint, checked field by field (an edited or foreign state is an error)."""
    defaults = asdict(TrainingState())
    problem = None
    if not isinstance(saved, dict) or set(saved) - set(defaults):
        problem = f"unexpected fields {sorted(set(saved) - set(defaults)) if isinstance(saved, dict) else saved!r}"
    else:
        for name, value in saved.items():
            allowed = (int, float) if isinstance(defaults[name], float) else type(defaults[name])
            if isinstance(value, bool) or not isinstance(value, allowed) \
                    or (allowed is not dict and not (np.isfinite(value) and value >= 0)):
                problem = f"{name} = {value!r}"
                break
    if problem:
        raise CheckpointError(f"the training_state of {path} is not one a training run writes ({problem}): restore "
                              "the file, or delete the folder to start afresh")
    return TrainingState(**saved)
