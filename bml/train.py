"""Train Binocular Mutual Learning (BML, ICCV 2021) with its published per-dataset recipe.

    bml-train --dataset miniImageNet                           # one process (or: python train_bml.py ...)
    torchrun --standalone --nproc_per_node 2 -m bml.train ...  # DDP, one episode per process per step
    bash train_bml.sh                                          # the embedded `glyphs` set, minutes on a CPU
"""

from __future__ import annotations

import argparse

from bml import cli
from bml.recipes import BML_LOSSES
from bml.training import get_common_parser, train
from bml.utils import argtypes


def get_args_parser() -> argparse.ArgumentParser:
    parser = get_common_parser("Train BML: a shared ResNet trunk with a global view (base-class classifier) "
                               "and a local view (episodic prototypes with an elastic margin) that learn "
                               "from each other. Flags left out follow the dataset's published recipe.", model="bml")
    losses = parser.add_argument_group("BML losses")
    losses.add_argument("--weights", type=argtypes.loss_weights, default=BML_LOSSES.weights,
                        help="weights of the global, local and mutual losses, joined by '_'")
    losses.add_argument("--alpha_1", type=argtypes.number(minimum=0), default=BML_LOSSES.alpha_1,
                        help="scale of the elastic margin of the local loss (0 disables the margin)")
    losses.add_argument("--alpha_2", type=argtypes.number(), default=BML_LOSSES.alpha_2,
                        help="slope of the sigmoid of the distance gap in the elastic margin")
    losses.add_argument("--T", type=argtypes.number(0, above_minimum=True), default=BML_LOSSES.T,
                        help="temperature of the mutual (cross-view) KL loss")
    losses.add_argument("--global_batch", type=argtypes.non_negative_int, default=0,
                        help="shuffled images added to each episode that only the global and mutual terms see "
                             "(our extension for thousands of base classes, e.g. Omniglot; 0 = as published)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Train and return the exit code (0 done, 1 error, 130/143 stopped by SIGINT/SIGTERM, resumable)."""
    return train(args).exit_code


def command() -> None:
    """The `bml-train` command."""
    cli.run_command(get_args_parser, main)


if __name__ == "__main__":
    command()
