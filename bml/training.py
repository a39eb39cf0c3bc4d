"""The training driver shared by `train_bml.py` and `train_baseline.py`.

One loop trains BML and both baselines; what differs is the method (`args.model`, its entry in
`bml.methods`): its model, its loss settings and how a step's images are drawn (episodes, or
shuffled batches for the global baseline). Around the loop: the per-dataset recipe, DDP, mixed
precision, checkpoints with exact resume (`bml.checkpoint`), validation, logging and clean stops on
SIGINT/SIGTERM.

Resume semantics: `last.pth` is written at the end of every epoch and, on SIGINT/SIGTERM, after
the step in progress (`epoch_step` > 0 then). It holds everything the run depends on (weights,
optimiser, scaler, lr, counters, every process's RNG state); episodes depend only on (seed,
rank, epoch) and each step's augmentation only on (seed, rank, epoch, step). So `--is_continue`
resumes bit-exactly on the same device and world size, also from the middle of an epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from bml import cli
from bml.calibration import calibrate_checkpoints
from bml.checkpoint import CheckpointError, checkpoint_state, resume, save_checkpoint
from bml.datasets import (AUGMENT_MODES, DatasetError, EpisodeSampler, build_dataset, build_training_loader,
                          canonical_name, default_num_workers, steps_per_epoch)
from bml.engine import NonFiniteLossError, TrainComponents, TrainingState, evaluate, train_one_epoch
from bml.evaluation import EvaluationError
from bml.methods import get_method
from bml.models import build_model
from bml.recipes import LR_BY_OPTIMIZER, MOMENTUM, WEIGHT_DECAY, apply_recipe, get_recipe, lr_factor, lr_schedule
from bml.utils import argtypes, distributed
from bml.utils.device import AMP_DTYPES, check_cuda_arch, configure_tf32, gpu_info, resolve_amp, tf32_active
from bml.utils.io import OutputError, check_output_folder, folder_lock, remove_orphan_temporaries
from bml.utils.logger import RunLogger
from bml.utils.rng import derive_seed, restore_rng_state, seed_everything

BACKBONES = ("Res12", "Res18")   # the original's names; bml.models accepts them
LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
RUN_RECORDS = (LAST_CHECKPOINT, BEST_CHECKPOINT, "epoch_*.pth", "log.txt")
"""Files that make a folder another run's: a fresh run never overwrites or appends to them."""
EXIT_FAILURE = 1
WEIGHT_GROWTH_LIMIT = 1e6
"""Weights whose norm grows past this many times their norm at the start have diverged."""
STOP_CAUSING_FLAGS = ("--lr", "--amp", "--amp_opt_level")
"""Flags the advice after a diverged run asks to change, so its resume command leaves them out."""
Result = TypeVar("Result")
VALIDATION_AMP = "off"   # eval_bml.py's default: the checkpoint is chosen at the precision it is evaluated at


class SettingsError(ValueError):
    """Settings that cannot work together; the message says which flag to change."""


# ----------------------------------------------------------------------------------------------
# Command line: the flags both entry scripts share


def get_common_parser(description: str) -> argparse.ArgumentParser:
    """Flags shared by BML and the baselines. Recipe flags default to None: `apply_recipe` fills them."""
    parser = argparse.ArgumentParser(description=description, formatter_class=cli.HelpFormatter,
                                     parents=[cli.dataset_parser(), cli.input_parser(), cli.episode_parser(),
                                              cli.device_parser(), cli.precision_parser()])
    parser.set_defaults(dataset="glyphs")   # the embedded set, as in train_bml.sh
    data = parser.add_argument_group("training data")
    data.add_argument("--augment", default=None, choices=AUGMENT_MODES,
                      help="where training images are augmented: 'host' (each worker runs the whole transform "
                           "in PIL) or 'device' (workers send uint8 images and their random parameters; crop, "
                           "colour jitter, flips and normalisation run batched on the training device); default: "
                           "device on a GPU, host on a CPU")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="Res12", choices=BACKBONES, help="ResNet-12 or ResNet-18")
    model.add_argument("--width", type=argtypes.number(0, above_minimum=True), default=None,
                       help="channel-width multiplier (1.0 = the published model); default: the recipe's")
    model.add_argument("--drop_rate", type=argtypes.number(0, 1, below_maximum=True), default=None,
                       help="dropout / DropBlock rate of the ResNet-12 blocks (recipe: 0.1)")

    episodes = parser.add_argument_group("training episodes")
    episodes.add_argument("--n_train_ways", type=argtypes.integer(minimum=2), default=None,
                          help="classes per training episode (recipe: 15)")
    episodes.add_argument("--n_train_shots", type=argtypes.positive_int, default=None,
                          help="support images per class (recipe: 5)")
    episodes.add_argument("--n_train_queries", type=argtypes.positive_int, default=None,
                          help="query images per class (recipe: 7)")
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
    validation.add_argument("--val_episodes", type=argtypes.positive_int, default=None,
                            help="validation episodes (recipe: 2000)")
    validation.add_argument("--eval_freq", type=argtypes.non_negative_int, default=None,
                            help="validate every this many epochs and after the last one; 0: never (recipe: 20)")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=argtypes.positive_int, default=None,
                              help="training epochs (recipe: 100; tiered 200)")
    optimisation.add_argument("--optim", default=None, choices=tuple(LR_BY_OPTIMIZER),
                              help=f"SGD (momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}) or Adam (no weight "
                                   "decay, as the original) (recipe: SGD)")
    optimisation.add_argument("--lr", type=argtypes.number(minimum=0), default=None,
                              help="initial learning rate (SGD 0.1, Adam 1e-3); decayed x0.06 after 50%% of the "
                                   "epochs and x0.2 after 70%% (Adam x0.1 at both; tieredImageNet x0.1 every 20%%)")
    optimisation.add_argument("--clip_grad", type=argtypes.number(minimum=0), default=None,
                              help="clip the gradient norm of each step to this value; 0: off (recipe: 0 as "
                                   "published; glyphs and Omniglot 10: keeps the local loss's large first gradients "
                                   "from inflating the BatchNorm-followed conv weights, which stalls learning; see "
                                   "docs/RESULTS.md)")
    optimisation.add_argument("--seed", type=argtypes.non_negative_int, default=0,
                              help="seed of initialisation, episodes and augmentation")

    run = parser.add_argument_group("run")
    run.add_argument("-s", "--save_folder", default=None,
                     help="where checkpoints and logs go; default: output/<a name recording the main settings>. "
                          "A fresh run refuses a folder given here that holds another run's checkpoints or log; "
                          "in the default folder it takes the next free <name>-2, <name>-3, ...")
    run.add_argument("--is_continue", action="store_true",
                     help="resume from last.pth in the save folder (exactly: same lr, counters, RNG); starts "
                          "afresh when there is none")
    run.add_argument("--save_freq", type=argtypes.non_negative_int, default=None,
                     help="also keep epoch_<N>.pth every this many epochs; 0: only best.pth and last.pth")
    run.add_argument("--print_freq", type=argtypes.positive_int, default=50,
                     help="steps between log lines and TensorBoard points")
    run.add_argument("--amp_opt_level", default=None, choices=("O0", "O1", "O2"),
                     help="the original's Apex level, used when --amp is not given: O0 = --amp off (the "
                          "original's default); O1 (Apex autocast with fp32 weights) = --amp fp16; O2 (Apex's "
                          "fp16 model with fp32 master weights) has no torch.amp equivalent and also becomes "
                          "--amp fp16 (autocast, fp32 weights), with a warning")
    run.add_argument("--tf32", default="on", choices=("on", "off"),
                     help="on: PyTorch's default, cuDNN convolutions in fp32 may use TF32 on GPUs of compute "
                          "capability 8.0+ (faster, 10-bit mantissa); off: full fp32 everywhere")
    run.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster on GPUs)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training step; compilation failures fall back to eager with a warning")
    run.add_argument("--dry_run", action="store_true",
                     help="print the resolved plan of the run (device, processes, episodes per step, precision, "
                          "schedule, ...) as one JSON object and exit, without reading images or using the GPU")
    return parser


# ----------------------------------------------------------------------------------------------
# Settings


def parse_weights(text: str) -> tuple[float, float, float]:
    """'2_1_0.5' -> (2.0, 1.0, 0.5): the global, local and mutual loss weights."""
    weights = argtypes.weight_values(text)
    if len(weights) != 3:
        raise SettingsError(f"--weights must be three numbers joined by '_' (global_local_mutual), e.g. 2_1_0.5; "
                         f"got {text!r}")
    return weights


def default_save_folder(args: argparse.Namespace) -> Path:
    """output/<name>, the name recording the settings that distinguish runs (as the original did)."""
    method = get_method(args)
    parts = [args.dataset, method.run_name, args.backbone, f"w{args.width:g}", f"{args.image_size}px",
             *method.run_name_parts(args)]
    if args.episodes_per_step != get_recipe(args.dataset).episodes_per_step:
        parts.append(f"x{args.episodes_per_step}")
    parts += [args.optim, f"lr{args.lr:g}"]
    if args.clip_grad:
        parts.append(f"clip{args.clip_grad:g}")
    parts += [f"e{args.epochs}", f"s{args.seed}"]
    return Path("output") / "_".join(str(part) for part in parts)


def resolve_episodes(args: argparse.Namespace, world_size: int) -> list[str]:
    """Split the recipe's global episodes per step over the processes (`args.episodes_per_process`).

    More processes than episodes only with --allow_more_processes: each then runs one, and the step
    averages `world_size` episodes. Returns the warnings.
    """
    episodes = args.episodes_per_step
    if world_size > episodes:
        if not args.allow_more_processes:
            raise SettingsError(
                f"{world_size} processes, but the recipe averages {episodes} episode(s) per step: start at most "
                f"{episodes} (bash train_bml.sh / train_baseline.sh do), or pass --allow_more_processes to average "
                f"{world_size} episodes per step (not the published recipe)")
        args.episodes_per_step = world_size
        warning = (f"--allow_more_processes: {world_size} processes of one episode each, so a step averages "
                   f"{world_size} episodes instead of the recipe's {episodes}, at the same lr: not the published "
                   "recipe")
        args.episodes_per_process = 1
        return [warning]
    if episodes % world_size:
        raise SettingsError(f"--episodes_per_step {episodes} cannot be split evenly over {world_size} processes: "
                            f"use a divisor of {episodes} processes, or change --episodes_per_step")
    args.episodes_per_process = episodes // world_size
    return []


def finish_settings(args: argparse.Namespace, context: distributed.DistributedContext) -> list[str]:
    """Fill the recipe and the derived settings in place and return the warnings; everything in `args`
    is a plain value (it is stored as the checkpoint's `config`).

    Raises SettingsError, or DeviceError when this torch build has no kernels for the GPU: before any
    data is read or any step runs.
    """
    args.dataset = canonical_name(args.dataset)
    apply_recipe(args)
    if "weights" in get_method(args).loss_flags:
        parse_weights(args.weights)
    check_cuda_arch(context.device)
    warnings = resolve_episodes(args, context.world_size)
    args.world_size = context.world_size
    args.device = str(context.device)
    args.amp, amp_warnings = resolve_amp(args.amp, args.amp_opt_level, context.device)
    args.validation_amp = VALIDATION_AMP
    trains_on_val = get_recipe(args.dataset).trains_on_val
    args.val_split = None if trains_on_val or args.eval_freq == 0 else "val"
    args.augment = args.augment or ("device" if context.device.type == "cuda" else "host")
    if args.num_workers is None:
        args.num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    args.save_folder = str(args.save_folder or default_save_folder(args))
    return warnings + amp_warnings


def run_plan(args: argparse.Namespace, world_size: int | None = None) -> dict:
    """The resolved plan of a run, as `--dry_run` prints it; neither reads images nor touches GPU memory.

    `world_size`: the number of processes the run will have (default: torchrun's WORLD_SIZE, else 1).
    Prints the warnings; raises what `finish_settings` raises.
    """
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = distributed.resolve_device(args.device, local_rank, select=False)
    context = distributed.DistributedContext(rank=0, local_rank=local_rank, world_size=world_size, device=device)
    warnings = finish_settings(args, context)
    for warning in warnings:
        warn(warning)
    gpu = gpu_info(device)
    return {
        "model": args.model, "dataset": args.dataset, "device": str(device),
        "gpu": None if gpu is None else gpu.as_dict(), "world_size": world_size,
        "episodes_per_step": args.episodes_per_step, "episodes_per_process": args.episodes_per_process,
        "amp": args.amp, "tf32": tf32_active(args.tf32, device), "validation_amp": args.validation_amp,
        "epochs": args.epochs,
        "steps_per_epoch": None if get_method(args).batches else args.episodes_per_epoch,
        **({"steps_per_epoch_rule": f"training images // {args.batch_size} (--batch_size): each episode slot "
                                    "of a step passes once over the training split per epoch"}
           if get_method(args).batches else {}),
        "lr_schedule": lr_schedule(args.lr, args.lr_milestones, args.lr_gammas), "optim": args.optim,
        "val_split": args.val_split, "transform": args.transform, "image_size": args.image_size,
        "save_folder": args.save_folder, "warnings": warnings,
    }


def run_records(folder: Path) -> list[str]:
    """The files of another run in `folder` (checkpoints, log), by name."""
    return sorted({path.name for pattern in RUN_RECORDS for path in folder.glob(pattern)})


def claim_run_folder(args: argparse.Namespace, explicit: bool, resources: contextlib.ExitStack) -> Path:
    """The folder this run writes to, checked writable and locked for the run (`resources` releases it).

    A fresh run never takes a folder that holds another run's checkpoints or log: a folder given with
    -s is refused, a default folder is replaced by the next free `<name>-2`, `<name>-3`, ... Orphan
    temporary files of a killed save are removed once the lock is held.
    """
    folder = Path(args.save_folder)
    if not args.is_continue and folder.is_dir() and run_records(folder):
        if explicit:
            raise SettingsError(f"{folder} already holds a run ({', '.join(run_records(folder))}): add "
                                "--is_continue to continue it, or delete that folder (or pass another -s) to start "
                                "afresh")
        taken = folder
        folder = next(candidate for candidate in (folder.with_name(f"{folder.name}-{n}") for n in range(2, 10**6))
                      if not (candidate.is_dir() and run_records(candidate)))
        info(f"{taken} already holds a run (continue it with --is_continue); this run goes to {folder}")
    check_output_folder(folder, "--save_folder")
    resources.enter_context(folder_lock(folder))
    for orphan in remove_orphan_temporaries(folder):
        info(f"removed {orphan}, left by a save that was killed")
    return folder


def on_main_process(check: Callable[[], Result]) -> Result:
    """`check()` run on the main process only; every process returns its result, or raises its error.

    Keeps the processes of a distributed run together when a check fails on rank 0 alone."""
    outcome = None
    if distributed.is_main_process():
        try:
            outcome = (True, check())
        except (SettingsError, DatasetError, OutputError) as error:
            outcome = (False, str(error))
    succeeded, value = distributed.all_gather_objects(outcome)[0]
    if not succeeded:
        raise SettingsError(value)
    return value


def check_validation_episodes(args: argparse.Namespace, val_set: Dataset | None) -> None:
    """Validation episodes must fit the val split: checked before training, not after the first epoch."""
    if val_set is None:
        return
    try:
        EpisodeSampler(val_set.labels, args.n_ways, args.n_shots, args.n_queries, episodes=args.val_episodes)
    except DatasetError as error:
        raise SettingsError(f"validation episodes ({args.n_ways}-way {args.n_shots}-shot {args.n_queries}-query) do "
                            f"not fit the val split of {args.dataset}: {error}. Change --n_ways, --n_shots or "
                            "--n_queries (or --eval_freq 0: no validation)") from None


def warn(message: str) -> None:
    if distributed.is_main_process():
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    if distributed.is_main_process():
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# Loss settings


def loss_settings(args: argparse.Namespace, epoch: int) -> dict:
    """Keyword arguments of `model.losses` for `epoch`; every model ignores those it does not use.

    The epoch is a 0-dim tensor, not an int: a compiled loss would otherwise specialise on its value
    and recompile at every new epoch (until torch's recompile limit silently falls back to eager).
    """
    settings = {"way": args.n_train_ways, "shot": args.n_train_shots, "query": args.n_train_queries,
                "epoch": torch.tensor(float(epoch), dtype=torch.float64), "max_epoch": args.epochs}
    settings.update({flag: getattr(args, flag) for flag in get_method(args).loss_flags})
    if "weights" in settings:
        settings["weights"] = parse_weights(settings["weights"])
    return settings


# ----------------------------------------------------------------------------------------------
# Model, optimiser, wrappers


class LossForward(nn.Module):
    """Makes `model.losses` the forward pass, so that DDP (and torch.compile) wrap the loss computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, settings: dict) -> dict[str, torch.Tensor]:
        return self.model.losses(images, labels, **settings)


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, or Adam without weight decay (as the original)."""
    if args.optim == "SGD":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return torch.optim.Adam(model.parameters(), lr=args.lr)


def set_epoch_lr(args: argparse.Namespace, optimizer: torch.optim.Optimizer, completed_epochs: int) -> float:
    """The published step schedule: the lr of the epoch after `completed_epochs`."""
    lr = args.lr * lr_factor(completed_epochs, args.lr_milestones, args.lr_gammas)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def wrap_for_training(args: argparse.Namespace, model: nn.Module, context: distributed.DistributedContext
                      ) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """(loss module, DDP wrapper or None): DDP under torchrun, then torch.compile if asked for."""
    loss_module: nn.Module = LossForward(model)
    ddp = None
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(loss_module, device_ids=device_ids)
        loss_module = ddp
    if args.compile:
        try:
            import torch._dynamo

            torch._dynamo.config.suppress_errors = True  # a backend failure falls back to eager, with a warning
            loss_module = torch.compile(loss_module)
        except Exception as error:  # torch.compile is unavailable on some platforms / Python versions
            warn(f"torch.compile is unavailable here ({error}); training without compilation")
    return loss_module, ddp


# ----------------------------------------------------------------------------------------------
# Checkpoints


def weight_norm(model: nn.Module) -> float:
    """The norm of all floating-point parameters together."""
    norms = torch._foreach_norm([p.detach().float() for p in model.parameters()])
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def check_weights_bounded(model: nn.Module, state: TrainingState, epoch: int) -> None:
    """Stop like a non-finite loss when the weights are non-finite or have grown past WEIGHT_GROWTH_LIMIT
    times their norm at the start (before this epoch is saved)."""
    norm = weight_norm(model)
    if not np.isfinite(norm) or norm > WEIGHT_GROWTH_LIMIT * state.initial_weight_norm:
        raise NonFiniteLossError(f"after epoch {epoch} the weights' norm is {norm:.4g}, more than "
                                 f"{WEIGHT_GROWTH_LIMIT:g} times its value at the start ({state.initial_weight_norm:.4g}): "
                                 "training has diverged. This epoch was not saved.")


def resume_command(args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> str:
    """The command that continues this run (the current one plus --is_continue and its save folder),
    without the flags in `leave_out` (and their values)."""
    argv, drop_value = [], False
    for arg in sys.argv[1:]:
        if drop_value:
            drop_value = False
        elif arg.split("=", 1)[0] in leave_out:
            drop_value = "=" not in arg
        elif arg != "--is_continue":
            argv.append(arg)
    if "-s" not in argv and "--save_folder" not in argv:
        argv += ["-s", args.save_folder]
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={args.world_size}"] if args.world_size > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *argv, "--is_continue"])


def next_steps(args: argparse.Namespace, checkpoint: Path) -> str:
    """The commands that use the trained `checkpoint`: the published evaluation protocol on the test split,
    and few-shot prediction on a folder of the user's own images."""
    data_root = ["--data_root", args.data_root] if args.data_root else []
    evaluate_script = Path(__file__).resolve().parents[1] / "eval_bml.sh"
    if evaluate_script.is_relative_to(Path.cwd()):
        evaluate_script = evaluate_script.relative_to(Path.cwd())
    evaluate_command = shlex.join(["bash", str(evaluate_script), args.dataset, args.transform, str(checkpoint),
                                   str(args.n_shots), *data_root])
    predict_command = shlex.join(["python", "-m", "bml.predict", "--ckp_path", str(checkpoint),
                                  "--support", "SUPPORT/", "--query", "IMAGES/", "--sheet", "sheet.png"])
    return (f"Evaluate it with the published protocol (10 seeds x 2,000 5-way {args.n_shots}-shot "
            f"episodes of the test split):\n  {evaluate_command}\n"
            "Classify your own images (SUPPORT/ holds one sub-folder of examples per class; IMAGES/ an image or "
            f"a folder):\n  {predict_command}")


# ----------------------------------------------------------------------------------------------
# Signals


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    The trainer then saves `last.pth` and exits with 128 + the signal number (130 for SIGINT, 143
    for SIGTERM), the shell convention for "stopped by this signal". Repeated signals are ignored:
    torchrun forwards the signal it receives to processes that may already have it from the
    terminal. SIGKILL stops at once, without a checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        self.pid = os.getpid()

    def __enter__(self) -> StopOnSignal:
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():   # Python delivers signals there only
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if os.getpid() == self.pid:   # forked loader workers inherit this handler: they stay quiet
                info(f"\n{signal.Signals(signum).name} received: saving a checkpoint after the current step")

    def requested(self) -> bool:
        return self.signum is not None


def agreed_stop(stop: StopOnSignal, device: torch.device) -> int:
    """The exit code of a stop requested on any process (0: none), the same on every process."""
    signum = torch.tensor([float(stop.signum or 0)], device=device)
    if distributed.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
    return 128 + int(signum.item()) if signum.item() > 0 else 0


# ----------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainingOutcome:
    exit_code: int
    model: nn.Module | None = None
    state: TrainingState | None = None
    save_folder: Path | None = None


def train(args: argparse.Namespace) -> TrainingOutcome:
    """Train `args.model` ('bml', 'global' or 'local') as `args` says; see the module docstring.

    Exit codes: 0 done, 1 a data/checkpoint/settings problem or a non-finite loss (message on
    stderr), 130/143 stopped by SIGINT/SIGTERM after saving `last.pth`.
    """
    context = None
    try:
        if args.dry_run:
            print(json.dumps(run_plan(args), indent=2))
            return TrainingOutcome(0)
        context = distributed.init_distributed_mode(args.device)
        with contextlib.ExitStack() as resources:
            return _train(args, context, resources)
    except (SettingsError, DatasetError, CheckpointError, NonFiniteLossError, EvaluationError, OutputError,
            distributed.DeviceError) as error:
        where = f" (rank {context.rank})" if context is not None and context.distributed else ""
        print(f"ERROR{where}: {error}", file=sys.stderr, flush=True)
        return TrainingOutcome(EXIT_FAILURE)
    finally:
        distributed.cleanup()


def _train(args: argparse.Namespace, context: distributed.DistributedContext,
           resources: contextlib.ExitStack) -> TrainingOutcome:
    explicit_folder = args.save_folder is not None
    for warning in finish_settings(args, context):
        warn(warning)
    args.save_folder = str(on_main_process(lambda: claim_run_folder(args, explicit_folder, resources)))
    save_folder = Path(args.save_folder)
    device, is_main = context.device, context.is_main_process
    seed_everything(args.seed + context.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        configure_tf32(args.tf32)

    train_set = build_dataset(args.dataset, "train", args.data_root, args.image_size, train=True,
                              transform=args.transform)
    val_set = None
    if args.val_split and is_main:
        val_set = build_dataset(args.dataset, args.val_split, args.data_root, args.image_size, train=False,
                                transform=args.transform, allow_uncropped_cub=args.allow_uncropped_cub)
    on_main_process(lambda: check_validation_episodes(args, val_set))
    args.num_classes = train_set.num_classes
    steps = steps_per_epoch(args, len(train_set))

    model = build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    loss_module, ddp = wrap_for_training(args, model, context)
    parts = TrainComponents(model=model, loss_module=loss_module, ddp=ddp, optimizer=optimizer, scaler=scaler,
                            device=device, amp_dtype=AMP_DTYPES[args.amp], channels_last=args.channels_last,
                            clip_grad=args.clip_grad)

    state, saved_rng = TrainingState(), None
    last_path = save_folder / LAST_CHECKPOINT
    if args.is_continue and last_path.is_file():
        state, saved_rng, warnings = resume(args, parts, last_path)
        for warning in warnings:
            warn(warning)
        info(f"Resuming {last_path}: epoch {state.epoch + 1}, {state.epoch_step} of {steps} steps done")
    elif args.is_continue:
        info(f"--is_continue: no {last_path} yet, starting afresh")
    if not state.initial_weight_norm:   # a fresh run (or a checkpoint from before this was recorded)
        state.initial_weight_norm = weight_norm(model)

    logger = RunLogger(save_folder, enabled=is_main)
    logger.write_config(args)
    info(f"Training {args.model} on {args.dataset} ({len(train_set)} images, {args.num_classes} classes): "
         f"{args.epochs} epochs of {steps} steps of {args.episodes_per_step} episode(s) ({args.episodes_per_process} "
         f"on each of {context.world_size} process(es)) on {device.type}, amp {args.amp}; saving to {save_folder}")
    if get_recipe(args.dataset).trains_on_val:
        info(f"{args.dataset} trains on its val classes too: no checkpoint is chosen on val; the final model "
             f"({last_path}) is the one to evaluate, as published")
    elif val_set is not None:
        info(f"Validation on {args.val_split} in {'fp32' if VALIDATION_AMP == 'off' else VALIDATION_AMP} (as "
             f"eval_bml.py evaluates) chooses {save_folder / BEST_CHECKPOINT}")
    if saved_rng is not None and len(saved_rng) == context.world_size:
        restore_rng_state(saved_rng[context.rank])
    elif saved_rng is not None:
        warn(f"the checkpoint holds RNG states of {len(saved_rng)} processes, this run has {context.world_size}: "
             "random streams are reseeded, so the run continues consistently but not bit-exactly")
        seed_everything(derive_seed(args.seed, context.rank, state.epoch, state.step))

    last_validation: dict[str, float] = {}
    with StopOnSignal() as stop:
        try:
            batches = build_training_loader(args, train_set, (state.epoch + 1, state.epoch_step), steps,
                                            context.rank, device)
            for epoch in range(state.epoch + 1, args.epochs + 1):
                set_epoch_lr(args, optimizer, epoch - 1)
                loader = islice(batches, steps - state.epoch_step)
                result = train_one_epoch(parts, loader, state, epoch=epoch, epochs=args.epochs, steps_per_epoch=steps,
                                         loss_settings=loss_settings(args, epoch), stop_requested=stop.requested,
                                         logger=logger, print_freq=args.print_freq, is_main=is_main)
                if result.interrupted:
                    checkpoint = checkpoint_state(args, parts, state)
                    saved = True
                    if is_main:
                        try:
                            save_checkpoint(last_path, checkpoint)
                        except OutputError as error:   # still stop as the signal asks, with its exit code
                            warn(str(error))
                            saved = False
                    return _stopped(args, agreed_stop(stop, device), last_path, model, state, saved)
                last_validation = end_epoch(args, parts, state, epoch, result.stats, val_set, logger) or last_validation
                exit_code = agreed_stop(stop, device)
                if exit_code and epoch < args.epochs:
                    return _stopped(args, exit_code, last_path, model, state)
        except NonFiniteLossError as error:
            kept = (f"the last good checkpoint is {last_path}" if last_path.is_file()
                    else "no checkpoint was written yet")
            raise NonFiniteLossError(f"{error}\nTraining stopped; {kept}. Lower --lr (this run: {args.lr:g}), try "
                                     "--amp off, or check the data; then resume with this command, adding the --lr "
                                     "or --amp you choose:\n  " + resume_command(args, STOP_CAUSING_FLAGS)) from error
        finally:
            logger.close()

    info(f"Done: {args.epochs} epochs. Last checkpoint: {last_path}")
    if val_set is not None:   # the main process: temperatures fitted on val, stored in last.pth and best.pth
        info(calibrate_checkpoints([last_path, save_folder / BEST_CHECKPOINT], val_set, args.n_ways, args.n_shots,
                                   args.n_queries, args.val_episodes, device, args.amp, args.num_workers))
    if last_validation:
        info(f"Validation accuracy ({args.n_ways}-way {args.n_shots}-shot, {args.val_episodes} episodes of the val "
             f"split): last {last_validation['acc']:.2f} +- {last_validation['ci95']:.2f}%, best "
             f"{state.max_accuracy:.2f}% at epoch {state.best_epoch}: {save_folder / BEST_CHECKPOINT}")
    info(f"Log: {save_folder / 'log.txt'}, TensorBoard: {save_folder / 'tensorboard'}")
    if is_main:
        write_curves(save_folder)
    info(next_steps(args, save_folder / (BEST_CHECKPOINT if state.best_epoch else LAST_CHECKPOINT)))
    return TrainingOutcome(0, model, state, save_folder)


def write_curves(save_folder: Path) -> None:
    """curves.png in the run folder (`bml.plot`); a plotting failure only warns: the run itself is done."""
    try:
        from bml.plot import CURVES, plot_runs   # imported here: matplotlib would slow down every `--help`

        info(f"Curves: {plot_runs([save_folder], save_folder / CURVES)}")
    except Exception as error:  # noqa: BLE001 (whatever goes wrong in drawing, the trained model stands)
        warn(f"could not draw the training curves ({type(error).__name__}: {error}); "
             f"draw them later with: python -m bml.plot {save_folder}")


def end_epoch(args: argparse.Namespace, parts: TrainComponents, state: TrainingState, epoch: int,
              train_stats: dict[str, float], val_set: Dataset | None, logger: RunLogger) -> dict[str, float]:
    """Validate when due (rank 0), log the epoch, write last.pth (and best.pth, epoch_<N>.pth).

    Returns the validation results, empty when there was no validation. Collective under DDP.
    """
    state.epoch, state.epoch_step, state.epoch_sums = epoch, 0, {}
    stats = {"epoch": epoch, "step": state.step, **train_stats}
    validation: dict[str, float] = {}
    due = args.eval_freq > 0 and (epoch % args.eval_freq == 0 or epoch == args.epochs)
    failure = None
    if val_set is not None and due:
        try:
            validation = validate(args, parts.model, val_set, parts.device)
        except EvaluationError as error:   # the epoch's training is still saved below
            failure = f"validation after epoch {epoch} failed: {error}"
    if validation:
        if validation["acc"] > state.max_accuracy:
            state.max_accuracy, state.best_epoch = validation["acc"], epoch
        stats.update({f"val_{key}": value for key, value in validation.items()})
        logger.scalars({f"val/{key}": value for key, value in validation.items()}, state.step)
        info(f"Epoch {epoch}: validation accuracy {validation['acc']:.2f} +- {validation['ci95']:.2f}% "
             f"(best {state.max_accuracy:.2f}% at epoch {state.best_epoch})")
    check_weights_bounded(parts.model, state, epoch)
    distributed.barrier()
    stats["max_accuracy"] = state.max_accuracy
    checkpoint = checkpoint_state(args, parts, state)
    save_folder = Path(args.save_folder)
    if distributed.is_main_process():
        if state.best_epoch == epoch:
            save_checkpoint(save_folder / BEST_CHECKPOINT, checkpoint)
        if args.save_freq > 0 and epoch % args.save_freq == 0:
            save_checkpoint(save_folder / f"epoch_{epoch}.pth", checkpoint)
        save_checkpoint(save_folder / LAST_CHECKPOINT, checkpoint)
    logger.epoch(stats)   # after the checkpoint: a resumed run never logs an epoch twice
    failure = distributed.all_gather_objects(failure)[0] if due else None
    if failure:
        raise EvaluationError(f"{failure}\nEpoch {epoch} was saved to {save_folder / LAST_CHECKPOINT}; resume with:\n  "
                              + resume_command(args))
    return validation


def validate(args: argparse.Namespace, model: nn.Module, val_set: Dataset, device: torch.device) -> dict[str, float]:
    """Validation accuracy on fixed episodes (seed 0), without touching the training RNG streams."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return evaluate(model, val_set, way=args.n_ways, shot=args.n_shots, query=args.n_queries,
                        episodes=args.val_episodes, seed=0, device=device, amp=args.validation_amp,
                        num_workers=args.num_workers, progress=sys.stderr.isatty())


def _stopped(args: argparse.Namespace, exit_code: int, last_path: Path, model: nn.Module,
             state: TrainingState, saved: bool = True) -> TrainingOutcome:
    where = f"epoch {state.epoch + 1} after step {state.epoch_step} (global step {state.step})"
    kept = (f"saved {last_path}" if saved else
            f"could not save it; {last_path} keeps the previous state" if last_path.is_file() else
            "could not save a checkpoint")
    info(f"Stopped in {where}; {kept}. Resume with:\n  {resume_command(args)}")
    return TrainingOutcome(exit_code, model, state, Path(args.save_folder))
