"""A run's settings: the recipe filled in, the derived values, and the plan `--dry_run` prints.

This is the only module of training that writes `args`: everything else reads it. After
`finish_settings` every entry is a plain value (`args` is stored as the checkpoint's `config`), and
later facts join it here too: the run folder once claimed (`record_run_folder`), the number of base
classes once the training split is open (`record_training_data`) and what torch.compile made of the step
(`record_compile_status`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from pathlib import Path

import numpy as np
import torch

from bml.datasets import (DATASETS, DatasetError, canonical_name, dataset_defaults, default_num_workers,
                          input_transform_settings, read_split)
from bml.datasets.image_files import read_image_sizes
from bml.datasets.transforms import HOST_ONLY_TRANSFORMS
from bml.methods import get_method
from bml.models.backbones import backbone_spec
from bml.recipes import (DECAY_STEP_GAMMA, FOLDER_RULE, LR_BY_OPTIMIZER, RECIPES, FolderFacts, Recipe,
                         decay_step_milestones, folder_recipe, get_recipe, lr_schedule)
from bml.training.estimate import WARN_AFTER_HOURS, rough_projection
from bml.training.flags import DEFAULT_BACKBONE_FLAG, DEFAULT_SAVE_PARENT
from bml.training.init_from import ARCHITECTURE_KEYS, checkpoint_architecture, planned_init
from bml.utils import argtypes, distributed
from bml.utils.device import check_cuda_arch, compute_precision, gpu_info, resolve_amp, tf32_active
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


def image_folder_facts(name: str, data_root: str | None) -> FolderFacts:
    """An image folder's size, from its file listing and the header of its first training image (no pixels read)."""
    train = read_split(name, "train", data_root, load_images=False)
    try:
        val_counts = np.bincount(read_split(name, "val", data_root, load_images=False).labels)
    except DatasetError:   # no val/ folder: no validation
        val_counts = np.zeros(0, dtype=np.int64)
    train_counts = np.bincount(train.labels)
    side = int(read_image_sizes(train.paths[:1]).min())
    return FolderFacts(train_classes=len(train_counts), train_images=int(train_counts.sum()),
                       min_train_images_per_class=int(train_counts.min()), val_classes=len(val_counts),
                       min_val_images_per_class=int(val_counts.min()) if len(val_counts) else 0, image_side=side)


def run_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe `apply_recipe` filled `args` from (an image folder's: derived from the facts it recorded)."""
    facts = getattr(args, "folder_facts", None)
    return get_recipe(args.dataset, getattr(args, "model", "bml"), folder=FolderFacts(**facts) if facts else None)


def apply_init_architecture(args: argparse.Namespace) -> None:
    """With --init_from, the checkpoint's backbone and width where not given (given ones must equal them);
    the model trained must be the checkpoint's kind."""
    if not getattr(args, "init_from", None):
        return
    try:
        architecture = checkpoint_architecture(args.init_from)
    except (OSError, ValueError) as problem:   # CheckpointError is a ValueError
        raise SettingsError(str(problem)) from None
    if architecture["model"] != args.model:
        raise SettingsError(f"--init_from {args.init_from} holds a {architecture['model']} model, this command "
                            f"trains {args.model}: fine-tune it with "
                            + ("train_bml.py" if architecture["model"] == "bml" else
                               f"train_baseline.py --mode {architecture['model']}"))
    recorded = {"backbone": backbone_spec(architecture["backbone"]).flag_name, "width": architecture["width"]}
    for key in ARCHITECTURE_KEYS:
        given = getattr(args, key, None)
        if given is not None and (backbone_spec(given).flag_name if key == "backbone" else given) != recorded[key]:
            raise SettingsError(f"--{key} {given} differs from the {recorded[key]} of --init_from {args.init_from}: "
                                f"leave --{key} out (a checkpoint's weights load only into its own architecture)")
        setattr(args, key, recorded[key])


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every recipe flag that `args` has and left at None from the recipe of `args.model` on `args.dataset`
    (in place, also returned).

    An image folder's recipe is derived from its size (`bml.recipes.FOLDER_RULE`; its facts are recorded in
    `args.folder_facts`). `args.transform` and `args.image_size` are filled from the data set's input settings
    (an image folder: at most its images' size); `args.lr_milestones` and `args.lr_gammas` are added: the decay
    points of this run (every --decay_step epochs when there is one, else the recipe's schedule). With
    --init_from, the backbone and width are the checkpoint's.
    """
    apply_init_architecture(args)
    if hasattr(args, "backbone") and args.backbone is None:
        args.backbone = DEFAULT_BACKBONE_FLAG
    folder_size = None
    if args.dataset not in DATASETS and hasattr(args, "n_train_ways"):   # an image folder to train on
        facts = image_folder_facts(args.dataset, getattr(args, "data_root", None))
        try:
            folder_size = folder_recipe(facts)[1]
        except ValueError as problem:
            raise SettingsError(f"{args.dataset}: {problem}") from None
        args.folder_facts = dataclasses.asdict(facts)
    recipe = run_recipe(args)
    for name in (f.name for f in dataclasses.fields(Recipe)):
        if name != "schedule" and hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    args.transform, args.image_size = input_transform_settings(
        {"dataset": args.dataset}, getattr(args, "image_size", None) or folder_size, getattr(args, "transform", None))
    if getattr(args, "lr", None) is None:
        args.lr = LR_BY_OPTIMIZER[args.optim]
    if getattr(args, "decay_step", None):
        args.lr_milestones = list(decay_step_milestones(args.decay_step, args.epochs))
        args.lr_gammas = [DECAY_STEP_GAMMA] * len(args.lr_milestones)
    else:
        args.lr_milestones = list(recipe.schedule.milestones(args.epochs))
        args.lr_gammas = list(recipe.schedule.gammas[args.optim])
    return args


def default_save_folder(args: argparse.Namespace) -> Path:
    """<--save_folder>/<name> (output/<name> by default), the name recording the settings that distinguish runs
    (as the original's `-s params` gave params/<name>)."""
    method = get_method(args)
    parts = [args.dataset, method.run_name, args.backbone, f"w{args.width:g}", f"{args.image_size}px",
             *([f"t{args.transform}"] if args.transform != dataset_defaults(args.dataset).transform else []),
             *(["rot"] if getattr(args, "rotation_classes", False) else []), *method.run_name_parts(args),
             *(["ingroup"] if getattr(args, "train_within_group", False) and not method.batches else [])]
    if args.episodes_per_step != run_recipe(args).episodes_per_step:
        parts.append(f"x{args.episodes_per_step}")
    parts += [args.optim, f"lr{args.lr:g}"]
    if args.clip_grad:
        parts.append(f"clip{args.clip_grad:g}")
    if getattr(args, "init_from", None):
        parts.append("finetuned")
    parts += [f"e{args.epochs}", f"s{args.seed}"]
    return Path(args.save_folder or DEFAULT_SAVE_PARENT) / "_".join(str(part) for part in parts)


def check_training_request(args: argparse.Namespace) -> None:
    """The original's flags that do not train here, refused with what to run instead."""
    if getattr(args, "is_eval", False):
        command = ["python", "eval_bml.py", "--dataset", args.dataset, "--ckp_path", args.ckp_path or "CHECKPOINT"]
        for flag in ("transform", "n_shots", "data_root"):
            if getattr(args, flag, None) is not None:
                command += [f"--{flag}", str(getattr(args, flag))]
        raise SettingsError(f"--is_eval: evaluation is eval_bml.py's (the published protocol: 10 seeds x 2,000 "
                            f"episodes); run: {shlex.join(command)}")
    if getattr(args, "spatial", False) and get_method(args).name == "bml":
        raise SettingsError("--spatial applies to --mode global or local (BML's losses are per position already): "
                            "leave it out, or add --mode global / --mode local")


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
    if getattr(args, "config", None) and not getattr(args, "config_read", False):
        raise SettingsError(f"--config {args.config} was not read: parse the command line with "
                            "bml.training.parse_training_args (the entry points do)")
    args.dataset = canonical_name(args.dataset)
    check_training_request(args)
    apply_recipe(args)
    if "weights" in get_method(args).loss_flags:
        parse_weights(args.weights)
    check_cuda_arch(context.device)
    warnings = resolve_episodes(args, context.world_size)
    args.world_size = context.world_size
    args.device = str(context.device)
    args.amp, amp_warnings = resolve_amp(args.amp, args.amp_opt_level, context.device)
    args.precision = compute_precision(args.amp, args.tf32, context.device)
    args.validation_amp = VALIDATION_AMP
    trains_on_val = run_recipe(args).trains_on_val
    args.val_split = None if trains_on_val or args.eval_freq == 0 else "val"
    host_only = args.transform in HOST_ONLY_TRANSFORMS
    if args.augment == "device" and host_only:
        raise SettingsError(f"--transform {args.transform}'s affine distortions run on the host only: use --augment "
                            "host (or leave --augment out)")
    args.augment = args.augment or ("device" if context.device.type == "cuda" and not host_only else "host")
    if args.num_workers is None:
        args.num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    args.save_folder = str(args.run_folder or default_save_folder(args))   # now the run's own folder
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


def record_compile_status(args: argparse.Namespace, status: dict) -> None:
    """What torch.compile made of the first steps (`bml.training.wrappers.compile_report`), kept in config.json."""
    args.compile_status = status


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
    facts = getattr(args, "folder_facts", None)
    projection = rough_projection(args, device.type, world_size, facts["train_images"] if facts else None)
    if projection and projection["hours"] > WARN_AFTER_HOURS:
        warnings.append(f"this recipe trains on {projection['training_images']:,} images: at about "
                        f"{projection['assumed_images_per_s']:g} images/s on {device.type} (a stated reference figure, "
                        f"not a measurement) that is about {projection['hours'] / 24:.1f} days. Measure it with "
                        "--estimate; shorten it with --epochs or --episodes_per_epoch, or train on a GPU")
    for warning in warnings:
        warn(warning)
    gpu = gpu_info(device)
    recipe = ({"rule": FOLDER_RULE, "folder": facts} if facts else
              {"rule": f"the recipe of {args.dataset} (bml.recipes.RECIPES)" if args.dataset in RECIPES else
               "the published recipe"})
    initialisation = None
    if args.init_from:
        try:
            initialisation = planned_init(vars(args), args.init_from).as_dict()
        except (OSError, ValueError) as problem:
            raise SettingsError(str(problem)) from None
    return {
        "model": args.model, "dataset": args.dataset, "device": str(device),
        "gpu": None if gpu is None else gpu.as_dict(), "world_size": world_size,
        "episodes_per_step": args.episodes_per_step, "episodes_per_process": args.episodes_per_process,
        "amp": args.amp, "precision": args.precision, "tf32": tf32_active(args.tf32, device),
        "validation_amp": args.validation_amp, "dropblock_counter": args.dropblock_counter,
        "epochs": args.epochs,
        "steps_per_epoch": None if get_method(args).batches else args.episodes_per_epoch,
        **({"steps_per_epoch_rule": f"training images // {args.batch_size} (--batch_size): each episode slot "
                                    "of a step passes once over the training split per epoch"}
           if get_method(args).batches else {}),
        "lr_schedule": lr_schedule(args.lr, args.lr_milestones, args.lr_gammas), "optim": args.optim,
        "val_split": args.val_split, "transform": args.transform, "image_size": args.image_size,
        "save_folder": args.save_folder, "save_freq": args.save_freq, "recipe": recipe, "init_from": initialisation,
        "projected_training": projection, "warnings": warnings,
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
