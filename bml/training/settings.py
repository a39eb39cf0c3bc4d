"""A run's settings: the recipe filled in, the derived values, and the plan `--dry_run` prints.

This is the only module of training that writes `args`: everything else reads it. After
`finish_settings` every entry is a plain value (`args` is stored as the checkpoint's `config`), and
two later facts join it here too: the run folder once claimed (`record_run_folder`) and the number of
base classes once the training split is open (`record_training_data`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from bml.datasets import canonical_name, default_num_workers, input_transform_settings
from bml.methods import get_method
from bml.recipes import LR_BY_OPTIMIZER, Recipe, get_recipe, lr_schedule
from bml.utils import argtypes, distributed
from bml.utils.device import check_cuda_arch, gpu_info, resolve_amp, tf32_active
from bml.utils.messages import warn

VALIDATION_AMP = "off"   # eval_bml.py's default: the checkpoint is chosen at the precision it is evaluated at


class SettingsError(ValueError):
    """Settings that cannot work together; the message says which flag to change."""


def parse_weights(text: str) -> tuple[float, float, float]:
    """'2_1_0.5' -> (2.0, 1.0, 0.5): the global, local and mutual loss weights, checked as the flag checks them
    (a run's settings may also come from a stored config)."""
    try:
        argtypes.loss_weights(text)
    except argparse.ArgumentTypeError as problem:
        raise SettingsError(f"--weights: {problem}") from None
    return argtypes.weight_values(text)


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every recipe flag that `args` has and left at None from `args.dataset`'s recipe (in place, also
    returned).

    `args.transform` and `args.image_size` are filled from the data set's input settings;
    `args.lr_milestones` and `args.lr_gammas` are added: the decay points of this run.
    """
    recipe = get_recipe(args.dataset)
    for name in (f.name for f in dataclasses.fields(Recipe)):
        if name != "schedule" and hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    args.transform, args.image_size = input_transform_settings(
        {"dataset": args.dataset}, getattr(args, "image_size", None), getattr(args, "transform", None))
    if getattr(args, "lr", None) is None:
        args.lr = LR_BY_OPTIMIZER[args.optim]
    args.lr_milestones = list(recipe.schedule.milestones(args.epochs))
    args.lr_gammas = list(recipe.schedule.gammas[args.optim])
    return args


def default_save_folder(args: argparse.Namespace) -> Path:
    """output/<name>, the name recording the settings that distinguish runs (as the original did)."""
    method = get_method(args)
    parts = [args.dataset, method.run_name, args.backbone, f"w{args.width:g}", f"{args.image_size}px",
             *method.run_name_parts(args)]
    if args.episodes_per_step != get_recipe(args.dataset).episodes_per_step:
        parts.append(f"x{args.episodes_per_step}")
    parts += [args.optim, f"lr{args.lr:g}"]
    if args.clip_grad:
        parts.append(f"clip{args.clip_grad:g}")
    parts += [f"e{args.epochs}", f"s{args.seed}"]
    return Path("output") / "_".join(str(part) for part in parts)


def resolve_episodes(args: argparse.Namespace, world_size: int) -> list[str]:
    """Split the recipe's global episodes per step over the processes (`args.episodes_per_process`).

    More processes than episodes only with --allow_more_processes: each then runs one, and the step
    averages `world_size` episodes. Returns the warnings.
    """
    episodes = args.episodes_per_step
    if world_size > episodes:
        if not args.allow_more_processes:
            raise SettingsError(
                f"{world_size} processes, but the recipe averages {episodes} episode(s) per step: start at most "
                f"{episodes} (bash train_bml.sh / train_baseline.sh do), or pass --allow_more_processes to average "
                f"{world_size} episodes per step (not the published recipe)")
        args.episodes_per_step = world_size
        warning = (f"--allow_more_processes: {world_size} processes of one episode each, so a step averages "
                   f"{world_size} episodes instead of the recipe's {episodes}, at the same lr: not the published "
                   "recipe")
        args.episodes_per_process = 1
        return [warning]
    if episodes % world_size:
        raise SettingsError(f"--episodes_per_step {episodes} cannot be split evenly over {world_size} processes: "
                            f"use a divisor of {episodes} processes, or change --episodes_per_step")
    args.episodes_per_process = episodes // world_size
    return []


def finish_settings(args: argparse.Namespace, context: distributed.DistributedContext) -> list[str]:
    """Fill the recipe and the derived settings in place and return the warnings; everything in `args`
    is a plain value (it is stored as the checkpoint's `config`).

    Raises SettingsError, or DeviceError when this torch build has no kernels for the GPU: before any
    data is read or any step runs.
    """
    args.dataset = canonical_name(args.dataset)
    apply_recipe(args)
    if "weights" in get_method(args).loss_flags:
        parse_weights(args.weights)
    check_cuda_arch(context.device)
    warnings = resolve_episodes(args, context.world_size)
    args.world_size = context.world_size
    args.device = str(context.device)
    args.amp, amp_warnings = resolve_amp(args.amp, args.amp_opt_level, context.device)
    args.validation_amp = VALIDATION_AMP
    trains_on_val = get_recipe(args.dataset).trains_on_val
    args.val_split = None if trains_on_val or args.eval_freq == 0 else "val"
    args.augment = args.augment or ("device" if context.device.type == "cuda" else "host")
    if args.num_workers is None:
        args.num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    args.save_folder = str(args.save_folder or default_save_folder(args))
    return warnings + amp_warnings


def record_run_folder(args: argparse.Namespace, folder: Path) -> None:
    """The folder the run claimed (`bml.training.run_folder.claim_run_folder`): it may differ from the one asked."""
    args.save_folder = str(folder)


TRAINING_COPIES = 4
"""Bytes held per parameter in training, in float32 words: the weights, their gradients, the optimiser's momentum
and a copy in flight (lower bound: Adam holds one more)."""


def episode_plan_bytes(episodes: int, num_classes: int, images_per_episode: int) -> int:
    """Memory that drawing `episodes` episodes at once takes (`EpisodeSampler.sample`: a random key and its rank per
    class, then the chosen indices), in bytes."""
    return episodes * (16 * num_classes + 8 * images_per_episode)


def step_memory_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """A lower bound of what one training step holds: (the model's parameters in training, the step's images and
    first-stage activations), in bytes. The model is built on the meta device: nothing is allocated."""
    from bml.models import build_model
    from bml.models.backbones import BACKBONES, canonical_backbone

    with torch.device("meta"):
        parameters = sum(parameter.numel() for parameter in build_model(args).parameters())
    method = get_method(args)
    per_episode = args.batch_size if method.batches else \
        args.n_train_ways * (args.n_train_shots + args.n_train_queries) + (getattr(args, "global_batch", 0) or 0)
    images = args.episodes_per_process * per_episode
    first_stage = BACKBONES[canonical_backbone(args.backbone)].channels[0] * args.width
    return 4 * TRAINING_COPIES * parameters, int(4 * images * args.image_size ** 2 * (3 + first_stage))


def check_training_memory(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model or a step that cannot fit the device's memory (`--width 100`,
    `--image_size 100000`), naming the flags that set its size."""
    from bml.evaluation.cache import available_memory_bytes

    parameters, step = step_memory_bytes(args)
    available = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else available_memory_bytes()
    if parameters + step > available:
        raise SettingsError(f"this run needs at least {(parameters + step) / 2**30:,.1f} GB on {device.type} (the "
                            f"model {parameters / 2**30:,.1f} GB in training, a step's images and first activations "
                            f"{step / 2**30:,.1f} GB), more than its {available / 2**30:,.1f} GB: lower --width "
                            f"({args.width:g}) or --image_size ({args.image_size}), or the images per step "
                            "(--n_train_ways, --n_train_shots, --n_train_queries, --episodes_per_step)")


def record_training_data(args: argparse.Namespace, num_classes: int) -> None:
    """What the model's size depends on, known once the training split is open."""
    args.num_classes = num_classes


def run_plan(args: argparse.Namespace, world_size: int | None = None) -> dict:
    """The resolved plan of a run, as `--dry_run` prints it; neither reads images nor touches GPU memory.

    `world_size`: the number of processes the run will have (default: torchrun's WORLD_SIZE, else 1).
    Prints the warnings; raises what `finish_settings` raises.
    """
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = distributed.resolve_device(args.device, local_rank, select=False)
    context = distributed.DistributedContext(rank=0, local_rank=local_rank, world_size=world_size, device=device)
    warnings = finish_settings(args, context)
    for warning in warnings:
        warn(warning)
    gpu = gpu_info(device)
    return {
        "model": args.model, "dataset": args.dataset, "device": str(device),
        "gpu": None if gpu is None else gpu.as_dict(), "world_size": world_size,
        "episodes_per_step": args.episodes_per_step, "episodes_per_process": args.episodes_per_process,
        "amp": args.amp, "tf32": tf32_active(args.tf32, device), "validation_amp": args.validation_amp,
        "epochs": args.epochs,
        "steps_per_epoch": None if get_method(args).batches else args.episodes_per_epoch,
        **({"steps_per_epoch_rule": f"training images // {args.batch_size} (--batch_size): each episode slot "
                                    "of a step passes once over the training split per epoch"}
           if get_method(args).batches else {}),
        "lr_schedule": lr_schedule(args.lr, args.lr_milestones, args.lr_gammas), "optim": args.optim,
        "val_split": args.val_split, "transform": args.transform, "image_size": args.image_size,
        "save_folder": args.save_folder, "warnings": warnings,
    }


def loss_settings(args: argparse.Namespace, epoch: int) -> dict:
    """Keyword arguments of `model.losses` for `epoch`; every model ignores those it does not use.

    The epoch is a 0-dim tensor, not an int: a compiled loss would otherwise specialise on its value
    and recompile at every new epoch (until torch's recompile limit silently falls back to eager).
    """
    settings = {"way": args.n_train_ways, "shot": args.n_train_shots, "query": args.n_train_queries,
                "epoch": torch.tensor(float(epoch), dtype=torch.float64), "max_epoch": args.epochs}
    settings.update({flag: getattr(args, flag) for flag in get_method(args).loss_flags})
    if "weights" in settings:
        settings["weights"] = parse_weights(settings["weights"])
    return settings
