"""Evaluate a BML or baseline checkpoint with the published few-shot protocol: the original's command, kept
(the logic is `bml.evaluate`).

    python eval_bml.py --dataset miniImageNet --ckp_path pretrained_weights/miniImageNet.pth --n_shots 5
    bash eval_bml.sh miniImageNet A pretrained_weights/miniImageNet.pth 5     # the original command
"""

from bml.evaluate import command, get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    command()
