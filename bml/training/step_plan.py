"""Which images each training step uses: the step plan of a run, and the loader that serves it (a training
concern: the plan depends on the method; the data layer only samples and loads).

Episodic training draws `--episodes_per_step` episodes per step from `EpisodeSampler`; the global
baseline draws shuffled batches, one full pass over the training split per episode slot and epoch.
The plan depends only on (seed, epoch), never on how many processes share it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import Dataset

from bml.datasets import DatasetError, EpisodeRule, build_step_loader, episode_sampler, shuffled_batches
from bml.methods import get_method
from bml.recipes import ORIGINAL_EVAL_EPISODES, ORIGINAL_EVAL_FREQ
from bml.utils.rng import derive_seed


def steps_per_epoch(args: argparse.Namespace, num_images: int) -> int:
    """Episodic training: --episodes_per_epoch; global baseline: one pass over the data per episode slot.

    The original's global baseline gave each of its 2 GPUs a full shuffled pass per epoch in batches of
    128: len(data) // 128 steps of 2 x 128 images (its last, partial batch is dropped here).
    """
    if not get_method(args).batches:
        return args.episodes_per_epoch
    steps = num_images // args.batch_size
    if steps < 1:
        raise DatasetError(f"the training split has {num_images} images, fewer than one batch of --batch_size "
                           f"{args.batch_size}: lower --batch_size")
    return steps


def training_steps(step: int) -> int:
    """--dropblock_counter steps: the DropBlock counter of a (0-based, global) step is the step itself."""
    return step


def original_forward_passes(step: int, steps_per_epoch: int, uncounted_per_epoch: int = 0) -> int:
    """--dropblock_counter original: the forward passes the original code's blocks had made at the pass of
    `step` (0-based), that pass included, had it trained with `steps_per_epoch` steps per epoch.

    Besides training passes, the original ran ORIGINAL_EVAL_EPISODES test episodes after every
    ORIGINAL_EVAL_FREQ-th epoch, each advancing the counter; `uncounted_per_epoch`: its passes per epoch that
    are not steps here (the global baseline's last, partial batch).
    """
    epochs_done = step // steps_per_epoch
    return (step + 1 + epochs_done * uncounted_per_epoch
            + epochs_done // ORIGINAL_EVAL_FREQ * ORIGINAL_EVAL_EPISODES)


def dropblock_counter(args: argparse.Namespace, num_images: int) -> Callable[[int], int]:
    """The DropBlock counter of each global step, as `args.dropblock_counter` says ('original' or 'steps')."""
    if args.dropblock_counter == "steps":
        return training_steps
    partial_batch = int(get_method(args).batches and num_images % args.batch_size > 0)
    return partial(original_forward_passes, steps_per_epoch=steps_per_epoch(args, num_images),
                   uncounted_per_epoch=partial_batch)


def training_episode_rule(args: argparse.Namespace) -> EpisodeRule:
    """How training episodes are drawn: within one group with --train_within_group (absent in older configs)."""
    return EpisodeRule(within_group=bool(getattr(args, "train_within_group", False)))


def step_plan(args: argparse.Namespace, data, epoch: int, rank: int) -> np.ndarray:
    """Dataset indices of every step of `epoch` on this rank: (steps, episodes_per_process, B). `data` is the
    training split (a `FewShotDataset`; its labels alone when episodes need not be drawn within groups).

    The plan of all `episodes_per_step` slots is drawn as by one process, and each rank takes its
    consecutive slots: the step's episodes do not depend on how many processes share them, so 2
    processes of 1 episode train exactly like 1 process of 2.
    """
    labels = np.asarray(getattr(data, "labels", data))
    steps = steps_per_epoch(args, len(labels))
    slots = args.episodes_per_step
    method = get_method(args)
    if method.batches:
        batches = np.stack([shuffled_batches(len(labels), args.batch_size, steps, seed=derive_seed(args.seed, slot),
                                             epoch=epoch) for slot in range(slots)], axis=1)
    else:
        sampler = episode_sampler(data, args.n_train_ways, args.n_train_shots, args.n_train_queries,
                                  episodes=steps * slots, seed=args.seed, rule=training_episode_rule(args))
        sampler.set_epoch(epoch)
        batches = sampler.sample()
        extra = getattr(args, method.extra_batch_flag) if method.extra_batch_flag else 0
        if extra:
            shuffled = shuffled_batches(len(labels), extra, steps * slots, seed=args.seed, epoch=epoch)
            batches = np.concatenate([batches, shuffled], axis=1)
    share = args.episodes_per_process
    return batches.reshape(steps, slots, -1)[:, rank * share:(rank + 1) * share]


def build_training_loader(args: argparse.Namespace, dataset: Dataset, first: tuple[int, int], steps: int, rank: int,
                          device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every remaining step of the run from `first` = (epoch, steps done in it): a resumed epoch skips the
    steps done."""
    plans = partial(step_plan, args, dataset, rank=rank)
    return iter(build_step_loader(dataset, plans, (args.seed, rank), first=first,
                                  last_epoch=args.epochs, steps_per_epoch=steps, num_workers=args.num_workers,
                                  augment=args.augment, device=device))
