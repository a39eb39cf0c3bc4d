"""The training flags that `train_bml.py` and `train_baseline.py` share (their own flags live in `bml.train`
and `bml.train_baseline`; flags several commands share are in `bml.cli`)."""

from __future__ import annotations

import argparse
import json

from bml import cli
from bml.datasets import AUGMENT_MODES, TIERED_LABELS
from bml.models.backbones import DEFAULT_BACKBONE, backbone_flag_choices, backbone_spec
from bml.recipes import DECAY_STEP_GAMMA, DROPBLOCK_COUNTERS, LR_BY_OPTIMIZER, MOMENTUM, WEIGHT_DECAY
from bml.utils import argtypes

DEFAULT_BACKBONE_FLAG = backbone_spec(DEFAULT_BACKBONE).flag_name
DEFAULT_SAVE_PARENT = "output"


def get_common_parser(description: str, model: str, modes: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """Flags shared by BML and the baselines; `model` is the method trained by default (`bml.methods`), `modes`
    those `--mode` offers (default: `model` alone). Recipe flags default to None:
    `bml.training.settings.apply_recipe` fills them."""
    parser = argparse.ArgumentParser(description=description, formatter_class=cli.HelpFormatter,
                                     parents=[cli.dataset_parser(), cli.input_parser(), cli.episode_parser(),
                                              cli.device_parser(), cli.precision_parser(),
                                              cli.checkpoint_parser(required=False)])
    parser.set_defaults(dataset="glyphs", model=model)   # the embedded set, as in train_bml.sh
    method = parser.add_argument_group("method")
    method.add_argument("--mode", dest="model", choices=modes or (model,),
                        help=f"the method trained (default: {model}): bml, the two views learning from each other; "
                             "global, a classifier over the base classes on shuffled batches; local, episodic "
                             "prototypes (no margin)")
    method.add_argument("--batch_size", type=argtypes.positive_int, default=None,
                        help="images per step and episode slot for --mode global (recipe: 128)")
    method.add_argument("--spatial", action="store_true",
                        help="--mode global / local: classify (global) or compare to prototypes (local) at every "
                             "feature-map position instead of on the pooled feature (BML's losses always are)")
    data = parser.add_argument_group("training data")
    data.add_argument("--augment", default=None, choices=AUGMENT_MODES,
                      help="where training images are augmented: 'host' (each worker runs the whole transform "
                           "in PIL) or 'device' (workers send uint8 images and their random parameters; crop, "
                           "colour jitter, flips and normalisation run batched on the training device); default: "
                           "device on a GPU, host on a CPU")
    data.add_argument("--tiered_labels", default=TIERED_LABELS[0], choices=TIERED_LABELS,
                      help="tieredImageNet, whose training joins train and val: offset numbers val's classes after "
                           "train's (448 distinct classes); raw concatenates the labels as the files store them, as "
                           "the original code did: where the files' ids overlap (python -m bml.datasets summary "
                           "says whether they do), a val class shares its classifier output with a train class")
    data.add_argument("--rotation_classes", action="store_true",
                      help="omniglot-lake: each training character turned by 90, 180 and 270 degrees makes three more "
                           "classes (as the Vinyals split's classes are); val and test stay upright")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default=None, choices=backbone_flag_choices(),
                       help=f"the ResNet of the trunk and views (the original's names); default: "
                            f"{DEFAULT_BACKBONE_FLAG}, with --init_from the checkpoint's")
    model.add_argument("--init_from", default=None, metavar="CHECKPOINT",
                       help="fine-tune: start from this checkpoint's trunk and views (a released one or a run's "
                            "best.pth; its backbone and width are used) with a new base-class classifier sized to "
                            "this run's training classes; the plan says what was loaded and what initialised")
    model.add_argument("--width", type=argtypes.number(0, above_minimum=True), default=None,
                       help="channel-width multiplier (1.0 = the published model); default: the recipe's")
    model.add_argument("--drop_rate", type=argtypes.number(0, 1, below_maximum=True), default=None,
                       help="dropout / DropBlock rate of the ResNet-12 blocks (recipe: 0.1)")
    model.add_argument("--dropblock_counter", default=None, choices=DROPBLOCK_COUNTERS,
                       help="what ramps DropBlock up (full drop after 40,000): original, the forward passes the "
                            "original code made, its 2,000 test episodes every 20 epochs included (full drop near "
                            "epoch 68 of 100; the published recipes); steps, the training steps only (epoch 80; "
                            "glyphs and Omniglot)")

    episodes = parser.add_argument_group("training episodes")
    episodes.add_argument("--n_train_ways", type=argtypes.integer(minimum=2), default=None,
                          help="classes per training episode (recipe: 15)")
    episodes.add_argument("--n_train_shots", type=argtypes.positive_int, default=None,
                          help="support images per class (recipe: 5)")
    episodes.add_argument("--n_train_queries", type=argtypes.positive_int, default=None,
                          help="query images per class (recipe: 7)")
    episodes.add_argument("--train_within_group", action="store_true",
                          help="every training episode's classes from one group of classes (omniglot-lake: one "
                               "alphabet), as --within_group draws evaluation episodes; groups smaller than "
                               "--n_train_ways are never drawn")
    episodes.add_argument("--episodes_per_epoch", type=argtypes.positive_int, default=None,
                          help="optimiser steps per epoch (recipe: 500); each step averages --episodes_per_step "
                               "episodes")
    episodes.add_argument("--episodes_per_step", type=argtypes.positive_int, default=None,
                          help="episodes (global baseline: batches), each its own forward/backward pass with its own "
                               "BatchNorm statistics, whose gradients are averaged into one optimiser step, over all "
                               "processes together; each process runs its share (recipe: 2, as published on 2 "
                               "GPUs; glyphs and omniglot 1)")
    episodes.add_argument("--allow_more_processes", action="store_true",
                          help="allow more processes than --episodes_per_step: each then runs one episode, so a "
                               "step averages one episode per process at the same lr (not the published recipe; "
                               "warns)")

    validation = parser.add_argument_group("validation (on the val split)")
    validation.add_argument("--val_episodes", "--episodes", dest="val_episodes", type=argtypes.positive_int,
                            default=None, help="validation episodes (recipe: 2000; --episodes: the original's name)")
    validation.add_argument("--eval_freq", type=argtypes.non_negative_int, default=None,
                            help="validate every this many epochs and after the last one; 0: never (recipe: 20)")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=argtypes.positive_int, default=None,
                              help="training epochs (recipe: 100; tiered 200)")
    optimisation.add_argument("--optim", default=None, choices=tuple(LR_BY_OPTIMIZER),
                              help="SGD (with --momentum and --weight_decay) or Adam (no weight decay, as the "
                                   "original) (recipe: SGD)")
    optimisation.add_argument("--momentum", type=argtypes.number(0, 1), default=MOMENTUM, help="SGD momentum")
    optimisation.add_argument("--weight_decay", type=argtypes.number(minimum=0), default=WEIGHT_DECAY,
                              help="SGD weight decay")
    optimisation.add_argument("--lr", type=argtypes.number(minimum=0), default=None,
                              help="initial learning rate (SGD 0.1, Adam 1e-3); decayed x0.06 after 50%% of the "
                                   "epochs and x0.2 after 70%% (Adam x0.1 at both; tieredImageNet x0.1 every 40 "
                                   "epochs)")
    optimisation.add_argument("--decay_step", type=argtypes.positive_int, default=None,
                              help=f"multiply the lr by {DECAY_STEP_GAMMA:g} every this many epochs instead of the "
                                   "recipe's schedule (the original's tieredImageNet schedule: 40)")
    optimisation.add_argument("--clip_grad", type=argtypes.number(minimum=0), default=None,
                              help="clip the gradient norm of each step to this value; 0: off (recipe: 0 as "
                                   "published; glyphs and Omniglot 10: keeps the local loss's large first gradients "
                                   "from inflating the BatchNorm-followed conv weights, which stalls learning; see "
                                   "docs/RESULTS.md)")
    optimisation.add_argument("--seed", type=argtypes.non_negative_int, default=0,
                              help="seed of initialisation, episodes and augmentation")

    run = parser.add_argument_group("run")
    run.add_argument("-s", "--save_folder", default=DEFAULT_SAVE_PARENT,
                     help="parent folder of the runs, as in the original: the run goes to <save_folder>/<a name "
                          "recording the main settings>, or to the next free <name>-2, <name>-3, ... when that "
                          "holds another run")
    run.add_argument("--run_folder", default=None,
                     help="the run's own folder exactly, instead of one under --save_folder; a fresh run refuses "
                          "it when it holds another run's checkpoints or log")
    run.add_argument("--is_continue", action="store_true",
                     help="resume from last.pth in the run folder (exactly: same lr, counters, RNG); starts "
                          "afresh when there is none")
    run.add_argument("--save_freq", type=argtypes.non_negative_int, default=None,
                     help="also keep epoch_<N>.pth every this many epochs, as the original's ckpt_epoch_<N>.pth "
                          "(recipe: 20); 0: only best.pth and last.pth")
    run.add_argument("--print_freq", type=argtypes.positive_int, default=50,
                     help="steps between log lines and TensorBoard points")
    run.add_argument("--amp_opt_level", default=None, choices=("O0", "O1", "O2"),
                     help="the original's Apex level, used when --amp is not given: O0 = --amp off (the "
                          "original's default); O1 (Apex autocast with fp32 weights) = --amp fp16; O2 (Apex's "
                          "fp16 model with fp32 master weights) has no torch.amp equivalent and also becomes "
                          "--amp fp16 (autocast, fp32 weights), with a warning")
    run.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster on GPUs)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training step; compilation failures fall back to eager with a warning; "
                          "what it compiled is printed after the first steps and kept in config.json")
    run.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                     help="accepted for `python -m torch.distributed.launch`, which passes it; the rank is read "
                          "from the environment (LOCAL_RANK), as under torchrun")
    run.add_argument("--is_eval", action="store_true",
                     help="the original's evaluation switch: stops, naming the eval_bml.py command that evaluates "
                          "--ckp_path")
    run.add_argument("--dry_run", action="store_true",
                     help="print the resolved plan of the run (device, processes, episodes per step, precision, "
                          "schedule, ...) as one JSON object and exit, without reading images or using the GPU")
    run.add_argument("--estimate", action="store_true",
                     help="time a few training steps of this run's shape on its device with synthetic images (no "
                          "data read, nothing saved), print the projected training time and, on a GPU, the peak "
                          "memory as one JSON object, and exit")
    run.add_argument("--config", default=None, metavar="RUN/config.json",
                     help="rerun a run's settings: every flag not given takes its value in this config.json (the "
                          "run folder, device and loader workers excepted); flags given on the command line win")
    return parser


NOT_RERUN = ("save_folder", "run_folder", "is_continue", "dry_run", "estimate", "config", "device", "num_workers")
"""Settings of a config.json that `--config` does not take over: where and on what this run goes, what it does."""
TRAINING_SCRIPTS = {"bml": "train_bml.py", "global": "train_baseline.py --mode global",
                    "local": "train_baseline.py --mode local"}


def stored_settings(parser: argparse.ArgumentParser, path: str) -> dict:
    """The settings of a run's config.json that `parser`'s flags take (all but `NOT_RERUN`); a config of another
    method's run is an error naming the command that reruns it."""
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError) as problem:
        parser.error(f"--config {path}: cannot read it as a run's config.json ({problem})")
    if not isinstance(stored, dict):
        parser.error(f"--config {path}: not a run's config.json (a JSON object of settings)")
    flags = {action.dest for action in parser._actions} | {"model"}
    model = stored.get("model", parser.get_default("model"))
    modes = {action.dest for action in parser._actions if action.choices and model in action.choices}
    if model != parser.get_default("model") and "model" not in modes:
        parser.error(f"--config {path} is of a {model} run: rerun it with python {TRAINING_SCRIPTS.get(model, model)} "
                     f"--config {path}")
    return {key: value for key, value in stored.items() if key in flags and key not in NOT_RERUN}


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, where `--config RUN/config.json` gives every flag left out its stored value."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=None)
    path = config.parse_known_args(argv)[0].config
    if path:
        parser.set_defaults(**stored_settings(parser, path), config_read=True)
    return parser.parse_args(argv)
