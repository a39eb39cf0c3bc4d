"""Train a single-view baseline (`--mode global` or `local`): the original's command, kept (the logic is
`bml.train_baseline`).

    python train_baseline.py --dataset miniImageNet --mode global
    bash train_baseline.sh glyphs local
"""

from bml.train_baseline import command, get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    command()
