"""Train BML with its published per-dataset recipe: the original's command, kept (the logic is `bml.train`).

    python train_bml.py --dataset miniImageNet                 # one process
    torchrun --standalone --nproc_per_node 2 train_bml.py ...  # DDP, one episode per process per step
    bash train_bml.sh                                          # the embedded `glyphs` set, minutes on a CPU
"""

from bml.train import command, get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    command()
