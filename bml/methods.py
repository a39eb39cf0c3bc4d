"""The training methods, one entry each: what differs between BML and the two baselines.

The training loop, the step plan and the run's folder name read a method's entry instead of
testing its name, so that a new method is one new `Method` in `METHODS` (plus its model in
`bml.models` and its entry script). Imports nothing else of the package.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


def _episode_shape(args: argparse.Namespace) -> list[str]:
    return [f"{args.n_train_ways}w{args.n_train_shots}s{args.n_train_queries}q"]


def _batch_shape(args: argparse.Namespace) -> list[str]:
    return [f"b{args.batch_size}"]


def _bml_parts(args: argparse.Namespace) -> list[str]:
    parts = [*_episode_shape(args), f"wt{args.weights}", f"a{args.alpha_1:g}_{args.alpha_2:g}", f"T{args.T:g}"]
    return parts + ([f"gb{args.global_batch}"] if args.global_batch else [])


def _spatial(shape: Callable[[argparse.Namespace], list[str]]) -> Callable[[argparse.Namespace], list[str]]:
    """A baseline's parts: its step shape, and 'spatial' when it classifies every feature-map position."""
    return lambda args: shape(args) + (["spatial"] if args.spatial else [])


@dataclass(frozen=True)
class Method:
    """How one training method differs from the others."""

    name: str                      # `args.model`, as recorded in checkpoints
    run_name: str                  # its part of the default run folder's name
    batches: bool                  # steps are shuffled batches (one pass over the split per slot), not episodes
    run_name_parts: Callable[[argparse.Namespace], list[str]]   # the settings that distinguish its runs
    loss_flags: tuple[str, ...] = ()   # flags passed on to `model.losses` (besides the episode shape and epoch)
    extra_batch_flag: str | None = None   # flag of shuffled images appended to each episode (0: none)


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("bml", "bml", batches=False, run_name_parts=_bml_parts,
           loss_flags=("alpha_1", "alpha_2", "T", "weights", "global_batch"), extra_batch_flag="global_batch"),
    Method("global", "baseline-global", batches=True, run_name_parts=_spatial(_batch_shape)),
    Method("local", "baseline-local", batches=False, run_name_parts=_spatial(_episode_shape)),
)}


def get_method(args: argparse.Namespace) -> Method:
    """The method `args.model` names."""
    return METHODS[args.model]
