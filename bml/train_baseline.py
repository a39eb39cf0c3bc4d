"""Train a single-view baseline: `global` (base-class classifier on shuffled batches) or `local`
(episodic prototypes), with the same backbone, recipe and training loop as BML.

    bml-train-baseline --dataset miniImageNet --mode global    # or: python train_baseline.py ...
    bash train_baseline.sh glyphs local
"""

from __future__ import annotations

import argparse

from bml import cli
from bml.training import get_common_parser, train
from bml.utils import argtypes


def get_args_parser() -> argparse.ArgumentParser:
    parser = get_common_parser("Train baseline-global (linear classifier over the base classes, shuffled batches) "
                               "or baseline-local (prototypes on the recipe's episodes, no margin). Flags left out "
                               "follow the dataset's published recipe.", model="global")
    baseline = parser.add_argument_group("baseline")
    baseline.add_argument("--mode", dest="model", choices=("global", "local"),
                          help="global: classifier over base classes; local: episodic prototype loss")
    baseline.add_argument("--batch_size", type=argtypes.positive_int, default=None,
                          help="images per step and process for --mode global (recipe: 128)")
    baseline.add_argument("--spatial", action="store_true",
                          help="classify (global) or compare to prototypes (local) at every feature-map position "
                               "instead of on the pooled feature")
    return parser


def main(args: argparse.Namespace) -> int:
    """Train and return the exit code (0 done, 1 error, 130/143 stopped by SIGINT/SIGTERM, resumable)."""
    return train(args).exit_code


def command() -> None:
    """The `bml-train-baseline` command."""
    cli.run_command(get_args_parser, main)


if __name__ == "__main__":
    command()
