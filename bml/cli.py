"""The command-line flags the entry points share, each defined once as an argparse parent (DeiT-style).

`train_bml.py`, `train_baseline.py`, `eval_bml.py` and `python -m bml.predict` build their parsers
with `parents=[...]` from these. A flag means the same everywhere; where an entry point needs
another default it says so with `parser.set_defaults`, and `--help` shows it (`HelpFormatter`).
Each function returns a new parser, so one entry point's defaults never leak into another's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import NoReturn

from bml.datasets import TRANSFORM_IDS, EpisodeRule, dataset_flag_help
from bml.utils import argtypes
from bml.utils.device import AMP_CHOICES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default unless it is None (flags whose help says where the value comes from) or a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def data_root_parser() -> argparse.ArgumentParser:
    """Where the data sets are (training, evaluation, and prediction's cl2n head, which centres on the
    checkpoint's training split)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument_group("data").add_argument(
        "--data_root", default=None, help="folder holding the data sets (default: $BML_DATA_ROOT, else data/)")
    return parser


def dataset_parser() -> argparse.ArgumentParser:
    """Which data set, and where the data sets are (training and evaluation)."""
    parser = argparse.ArgumentParser(add_help=False, parents=[data_root_parser()])
    data = parser.add_argument_group("data set")
    data.add_argument("--dataset", default=None,
                      help=f"{dataset_flag_help()}; evaluation: the data set the model was trained on (default "
                           "there: the checkpoint's)")
    data.add_argument("--allow_uncropped_cub", action="store_true",
                      help="CUB: evaluate (or validate) on the uncropped CUB_200_2011 images when the bounding-box "
                           "crops (CUB_test/) are missing; not the published protocol (warns, recorded in the "
                           "results)")
    return parser


def input_parser() -> argparse.ArgumentParser:
    """The model's input settings: a checkpoint's when there is one, else the data set's."""
    parser = argparse.ArgumentParser(add_help=False)
    inputs = parser.add_argument_group("model input (default: the checkpoint's when there is one, else the "
                                       "data set's)")
    inputs.add_argument("--transform", default=None, choices=TRANSFORM_IDS,
                        help="transform id (docs/ARCHITECTURE.md, Transforms)")
    inputs.add_argument("--image_size", type=argtypes.image_size, default=None,
                        help="input size in pixels (data sets: 84; glyphs 32, omniglot 28)")
    return parser


def device_parser() -> argparse.ArgumentParser:
    """Where the model runs and how many processes load its images."""
    parser = argparse.ArgumentParser(add_help=False)
    compute = parser.add_argument_group("device")
    compute.add_argument("--device", default=None,
                         help="cpu, cuda or cuda:<i>; default: the GPU of this process if any, else cpu")
    compute.add_argument("--num_workers", type=argtypes.non_negative_int, default=None,
                         help="data-loading processes (per training process); default: the CPUs left after the "
                              "training processes (evaluation, prediction: this one), shared between them (1 to 8)")
    return parser


def precision_parser() -> argparse.ArgumentParser:
    """The autocast precision and TF32 of training or of embedding."""
    parser = argparse.ArgumentParser(add_help=False)
    precision = parser.add_argument_group("precision")
    precision.add_argument(
        "--amp", default=None, choices=AMP_CHOICES,
        help="autocast precision: off = fp32, the published recipe (training's default, unless --amp_opt_level); "
             "bf16 (native from compute capability 8.0; older GPUs get fp16 with a warning); fp16 (training: with "
             "a gradient scaler). Mixed precision is faster and lighter, at slightly different numerics")
    precision.add_argument("--tf32", default="on", choices=("on", "off"),
                           help="on: PyTorch's default, cuDNN convolutions in fp32 may use TF32 on GPUs of compute "
                                "capability 8.0+ (faster, 10-bit mantissa); off: full fp32 everywhere. What is in "
                                "force is recorded (the training plan, the evaluation's JSON): never TF32 on the CPU "
                                "or on GPUs below 8.0 (V100)")
    return parser


def episode_parser() -> argparse.ArgumentParser:
    """The shape of the evaluation episodes: the test protocol, or validation during training."""
    parser = argparse.ArgumentParser(add_help=False)
    episodes = parser.add_argument_group("evaluation episodes (training: validation on the val split)")
    episodes.add_argument("--n_ways", type=argtypes.integer(minimum=2), default=None,
                          help="classes per episode (training: the recipe's, 5)")
    episodes.add_argument("--n_shots", type=argtypes.positive_int, default=None,
                          help="support images per class (training: the recipe's, 1)")
    episodes.add_argument("--n_queries", type=argtypes.positive_int, default=None,
                          help="query images per class (training: the recipe's, 15)")
    episodes.add_argument("--within_group", action="store_true",
                          help="every episode's classes from one group of classes, the group drawn uniformly among "
                               "those with at least --n_ways classes (omniglot, omniglot-lake: one alphabet, as Lake "
                               "et al.'s one-shot runs)")
    episodes.add_argument("--distinct_drawers", action="store_true",
                          help="support and query images by different people: each episode draws n_shots + "
                               "n_queries drawers, one for each support and query position (data sets that record "
                               "drawers: omniglot, omniglot-lake)")
    return parser


def episode_rule(args: argparse.Namespace) -> EpisodeRule:
    """The `EpisodeRule` of the --within_group and --distinct_drawers flags, each named as its part of the rule
    (absent in older configs: off)."""
    return EpisodeRule(**{part.name: bool(getattr(args, part.name, False)) for part in dataclasses.fields(EpisodeRule)})


def episode_rule_flags(rule: EpisodeRule) -> list[str]:
    """The flags that ask for `rule` (the inverse of `episode_rule`)."""
    return [f"--{name}" for name in rule.active]


def checkpoint_parser(required: bool = True) -> argparse.ArgumentParser:
    """A trained checkpoint: what evaluation and prediction read (training takes it with the original's
    --is_eval, to name the evaluation command)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--ckp_path", required=required, default=None, help="checkpoint (released or this project's)")
    return parser


def embedding_parser() -> argparse.ArgumentParser:
    """A trained checkpoint and how its images are embedded (evaluation and prediction)."""
    parser = argparse.ArgumentParser(add_help=False, parents=[checkpoint_parser()])
    embedding = parser.add_argument_group("embedding")
    embedding.add_argument("--embed_batch_size", "--batch_size", dest="embed_batch_size",
                           type=argtypes.positive_int, default=128,
                           help="images per forward pass when embedding (--batch_size: its former name)")
    embedding.add_argument("--no_progress", action="store_true",
                           help="no progress bars")
    return parser


def run_command(get_args_parser: Callable[[], argparse.ArgumentParser], main: Callable[[argparse.Namespace], int],
                description: str | None = None,
                parse: Callable[[argparse.ArgumentParser], argparse.Namespace] = argparse.ArgumentParser.parse_args
                ) -> NoReturn:
    """A console command: parse the command line with the command's parser and exit with `main`'s code.

    `description`: the parser is one built to serve as a parent (`add_help=False`), so it is wrapped in one
    that has `--help`, this description and `HelpFormatter`. `parse`: how the parser reads the command line
    (training's also reads `--config`).
    """
    parser = get_args_parser()
    if description is not None:
        parser = argparse.ArgumentParser(parents=[parser], description=description, formatter_class=HelpFormatter)
    sys.exit(main(parse(parser)))
