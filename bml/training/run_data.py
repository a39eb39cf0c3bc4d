"""The data of a run: the splits opened and checked against every episode shape of the run (training steps,
validation) before any work, so that a shape the split cannot hold is an error naming its flag, not a failure
inside a loader worker."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from bml.cli import episode_rule
from bml.datasets import DatasetError, build_dataset, episode_sampler
from bml.evaluation.cache import available_memory_bytes
from bml.methods import get_method
from bml.training.processes import on_main_process
from bml.training.settings import (SettingsError, check_training_memory, episode_plan_bytes,
                                   record_training_data)
from bml.training.step_plan import steps_per_epoch, training_episode_rule
from bml.utils import distributed


@dataclass
class RunData:
    """The open splits of a run and its steps per epoch."""

    train_set: Dataset
    val_set: Dataset | None
    steps: int


def open_data(args: argparse.Namespace, context: distributed.DistributedContext) -> RunData:
    """The training split (every process) and the val split (the main process, which validates), checked
    against the run's episodes before any step."""
    train_set = build_dataset(args.dataset, "train", args.data_root, args.image_size, train=True,
                              transform=args.transform, tiered_labels=args.tiered_labels,
                              rotation_classes=getattr(args, "rotation_classes", False))
    check_training_episodes(args, train_set)
    val_set = None
    if args.val_split and context.is_main_process:
        val_set = build_dataset(args.dataset, args.val_split, args.data_root, args.image_size, train=False,
                                transform=args.transform, allow_uncropped_cub=args.allow_uncropped_cub)
    on_main_process(lambda: check_validation_episodes(args, val_set))
    record_training_data(args, train_set.num_classes)
    check_training_memory(args, context.device)
    return RunData(train_set, val_set, steps_per_epoch(args, len(train_set)))


def check_training_episodes(args: argparse.Namespace, train_set) -> None:
    """Every training step's shape must fit the training split (a `FewShotDataset`, or its labels when episodes need
    not be drawn within groups): checked here, not inside a loader worker."""
    labels = np.asarray(getattr(train_set, "labels", train_set))
    counts = np.bincount(labels)
    method = get_method(args)
    if not method.batches:
        rule = training_episode_rule(args)
        try:
            episode_sampler(train_set, args.n_train_ways, args.n_train_shots, args.n_train_queries, episodes=1,
                            rule=rule)
        except DatasetError as problem:
            if rule.within_group:
                raise SettingsError(f"training episodes within one group do not fit the training split of "
                                    f"{args.dataset}: {problem}; lower --n_train_ways or leave out "
                                    "--train_within_group") from None
            raise SettingsError(
                f"training episodes of {args.n_train_ways} ways x ({args.n_train_shots} shots + {args.n_train_queries} "
                f"queries) do not fit the training split of {args.dataset}: {len(counts)} classes, the smallest of "
                f"{counts.min()} images. Use --n_train_ways at most {len(counts)} and --n_train_shots + "
                f"--n_train_queries at most {counts.min()}") from None
    extra = getattr(args, method.extra_batch_flag) if method.extra_batch_flag else 0
    images_per_epoch = extra * args.episodes_per_epoch * args.episodes_per_step
    if images_per_epoch > len(labels):
        raise SettingsError(
            f"--{method.extra_batch_flag} {extra} over {args.episodes_per_epoch} steps of {args.episodes_per_step} "
            f"episode(s) needs {images_per_epoch} distinct images an epoch, but the training split of {args.dataset} "
            f"has {len(labels)}: lower --{method.extra_batch_flag} (at most "
            f"{len(labels) // (args.episodes_per_epoch * args.episodes_per_step)}) or --episodes_per_epoch")


def check_validation_episodes(args: argparse.Namespace, val_set: Dataset | None) -> None:
    """Validation episodes must fit the val split: checked before training, not after the first epoch."""
    if val_set is None:
        return
    needed = episode_plan_bytes(args.val_episodes, val_set.num_classes, args.n_ways * (args.n_shots + args.n_queries))
    if needed > available_memory_bytes():
        raise SettingsError(f"--val_episodes {args.val_episodes} needs about {needed / 2**30:,.1f} GB to draw, more "
                            f"than the {available_memory_bytes() / 2**30:,.1f} GB of memory available: lower "
                            "--val_episodes (the published protocol uses 2,000 per seed)")
    try:
        episode_sampler(val_set, args.n_ways, args.n_shots, args.n_queries, args.val_episodes, rule=episode_rule(args))
    except DatasetError as problem:
        raise SettingsError(f"validation episodes ({args.n_ways}-way {args.n_shots}-shot {args.n_queries}-query) do "
                            f"not fit the val split of {args.dataset}: {problem}. Change --n_ways, --n_shots, "
                            "--n_queries, --within_group or --distinct_drawers (or --eval_freq 0: no validation)"
                            ) from None
