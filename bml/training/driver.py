"""The training driver shared by `train_bml.py` and `train_baseline.py`.

One loop trains BML and both baselines; what differs is the method (`args.model`, its entry in
`bml.methods`): its model, its loss settings and how a step's images are drawn (episodes, or
shuffled batches for the global baseline). Around the loop: the per-dataset recipe, DDP, mixed
precision, checkpoints with exact resume (`bml.training.state`), validation, logging and clean stops on
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
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from bml.calibration import calibrate_checkpoints
from bml.checkpoint import CheckpointError, save_checkpoint
from bml.datasets import DatasetError, EpisodeSampler, build_dataset
from bml.evaluation import EvaluationError
from bml.evaluation.cache import available_memory_bytes
from bml.methods import get_method
from bml.models import build_model
from bml.recipes import get_recipe
from bml.training.engine import evaluate, train_one_epoch
from bml.training.guard import STOP_CAUSING_FLAGS, NonFiniteLossError, check_weights_bounded, weight_norm
from bml.training.processes import agreed_stop, on_main_process
from bml.training.run_folder import BEST_CHECKPOINT, LAST_CHECKPOINT, claim_run_folder, next_steps, resume_command
from bml.training.settings import (SettingsError, check_training_memory, episode_plan_bytes, finish_settings,
                                   loss_settings, record_run_folder, record_training_data, run_plan)
from bml.training.signals import StopOnSignal
from bml.training.state import TrainComponents, TrainingState, checkpoint_state, restore_saved_rng, resume
from bml.training.step_plan import build_training_loader, steps_per_epoch
from bml.training.wrappers import build_optimizer, set_epoch_lr, wrap_for_training
from bml.utils import distributed
from bml.utils.device import AMP_DTYPES, configure_tf32
from bml.utils.io import OutputError
from bml.utils.logger import RunLogger
from bml.utils.messages import error, info, log_to, warn
from bml.utils.rng import derive_seed, seed_everything

EXIT_FAILURE = 1
MESSAGES_FILE = "messages.txt"
"""Everything the run told the user, kept in its folder (batch jobs lose their terminal)."""


@dataclass
class TrainingOutcome:
    exit_code: int
    model: nn.Module | None = None
    state: TrainingState | None = None
    save_folder: Path | None = None


@dataclass
class RunData:
    """The open splits of a run and its steps per epoch."""

    train_set: Dataset
    val_set: Dataset | None
    steps: int


def train(args: argparse.Namespace) -> TrainingOutcome:
    """Train `args.model` ('bml', 'global' or 'local') as `args` says; see the module docstring.

    Exit codes: 0 done, 1 a data/checkpoint/settings problem or a non-finite loss (message on
    stderr), 130/143 stopped by SIGINT/SIGTERM after saving `last.pth`.
    """
    context = None
    try:
        if args.dry_run:
            print(json.dumps(run_plan(args), indent=2))   # the command's output, not a message
            return TrainingOutcome(0)
        context = distributed.init_distributed_mode(args.device)
        with contextlib.ExitStack() as resources:
            return _train(args, context, resources)
    except (SettingsError, DatasetError, CheckpointError, NonFiniteLossError, EvaluationError, OutputError,
            distributed.DeviceError) as problem:
        where = f"rank {context.rank}: " if context is not None and context.distributed else ""
        error(f"{where}{problem}", every_rank=True)
        return TrainingOutcome(EXIT_FAILURE)
    finally:
        log_to(None)
        distributed.cleanup()


def _train(args: argparse.Namespace, context: distributed.DistributedContext,
           resources: contextlib.ExitStack) -> TrainingOutcome:
    explicit_folder = args.save_folder is not None
    for warning in finish_settings(args, context):
        warn(warning)
    data = open_data(args, context)
    save_folder = prepare_run(args, context, resources, explicit_folder)
    parts = build_components(args, context)
    state = restore_or_start(args, parts, context, save_folder / LAST_CHECKPOINT, data.steps)
    fresh = not (args.is_continue and (save_folder / LAST_CHECKPOINT).is_file())
    logger = RunLogger(save_folder, enabled=context.is_main_process, fresh=fresh)
    logger.write_config(args)
    announce(args, context, data, save_folder)
    with StopOnSignal() as stop:
        try:
            stopped, last_validation = run_epochs(args, parts, state, data, logger, stop, context.rank)
        finally:
            logger.close()
    if stopped is not None:
        return stopped
    return finish(args, parts, state, data, last_validation, save_folder, context.is_main_process)


def prepare_run(args: argparse.Namespace, context: distributed.DistributedContext,
                resources: contextlib.ExitStack, explicit_folder: bool) -> Path:
    """The run folder claimed and locked (after the settings and the data are checked: a run that cannot start
    claims nothing), the random streams seeded, the GPU configured."""
    folder = on_main_process(lambda: claim_run_folder(args, explicit_folder, resources))
    record_run_folder(args, folder)
    log_to(folder / MESSAGES_FILE)
    seed_everything(args.seed + context.rank)
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        configure_tf32(args.tf32)
    return Path(args.save_folder)


def open_data(args: argparse.Namespace, context: distributed.DistributedContext) -> RunData:
    """The training split (every process) and the val split (the main process, which validates), checked
    against the run's episodes before any step."""
    train_set = build_dataset(args.dataset, "train", args.data_root, args.image_size, train=True,
                              transform=args.transform)
    val_set = None
    if args.val_split and context.is_main_process:
        val_set = build_dataset(args.dataset, args.val_split, args.data_root, args.image_size, train=False,
                                transform=args.transform, allow_uncropped_cub=args.allow_uncropped_cub)
    check_episode_shapes(args, train_set)
    on_main_process(lambda: check_validation_episodes(args, val_set))
    record_training_data(args, train_set.num_classes)
    check_training_memory(args, context.device)
    return RunData(train_set, val_set, steps_per_epoch(args, len(train_set)))


def check_episode_shapes(args: argparse.Namespace, train_set: Dataset) -> None:
    """Training episodes must fit the training split: checked before the run folder is claimed, not found in a
    loader worker."""
    if get_method(args).batches:
        return
    try:
        EpisodeSampler(train_set.labels, args.n_train_ways, args.n_train_shots, args.n_train_queries, episodes=1)
    except DatasetError as problem:
        raise SettingsError(f"training episodes ({args.n_train_ways}-way {args.n_train_shots}-shot "
                            f"{args.n_train_queries}-query) do not fit the training split of {args.dataset}: "
                            f"{problem}. Change --n_train_ways, --n_train_shots or --n_train_queries") from None


def check_validation_episodes(args: argparse.Namespace, val_set: Dataset | None) -> None:
    """Validation episodes must fit the val split: checked before training, not after the first epoch."""
    if val_set is None:
        return
    needed = episode_plan_bytes(args.val_episodes, val_set.num_classes, args.n_ways * (args.n_shots + args.n_queries))
    if needed > available_memory_bytes():
        raise SettingsError(f"--val_episodes {args.val_episodes} needs about {needed / 2**30:,.1f} GB to draw, more "
                            f"than the {available_memory_bytes() / 2**30:,.1f} GB of memory available: lower "
                            "--val_episodes (the published protocol uses 2,000 per seed)")
    try:
        EpisodeSampler(val_set.labels, args.n_ways, args.n_shots, args.n_queries, episodes=args.val_episodes)
    except DatasetError as problem:
        raise SettingsError(f"validation episodes ({args.n_ways}-way {args.n_shots}-shot {args.n_queries}-query) do "
                            f"not fit the val split of {args.dataset}: {problem}. Change --n_ways, --n_shots or "
                            "--n_queries (or --eval_freq 0: no validation)") from None


def build_components(args: argparse.Namespace, context: distributed.DistributedContext) -> TrainComponents:
    """The model on its device, its optimiser, gradient scaler and training wrappers."""
    device = context.device
    model = build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    loss_module, ddp = wrap_for_training(args, model, context)
    return TrainComponents(model=model, loss_module=loss_module, ddp=ddp, optimizer=optimizer, scaler=scaler,
                           device=device, amp_dtype=AMP_DTYPES[args.amp], channels_last=args.channels_last,
                           clip_grad=args.clip_grad)


def restore_or_start(args: argparse.Namespace, parts: TrainComponents, context: distributed.DistributedContext,
                     last_path: Path, steps: int) -> TrainingState:
    """The counters of the run: those of `last_path` with `--is_continue` (weights, optimiser and random
    streams restored too), else fresh ones."""
    state, saved_rng = TrainingState(), None
    if args.is_continue and last_path.is_file():
        state, saved_rng, warnings = resume(args, parts, last_path)
        for warning in warnings:
            warn(warning)
        info(f"Resuming {last_path}: epoch {state.epoch + 1}, {state.epoch_step} of {steps} steps done")
    elif args.is_continue:
        info(f"--is_continue: no {last_path} yet, starting afresh")
    if not state.initial_weight_norm:   # a fresh run (or a checkpoint from before this was recorded)
        state.initial_weight_norm = weight_norm(parts.model)
    if saved_rng is not None and len(saved_rng) == context.world_size:
        restore_saved_rng(saved_rng[context.rank], last_path)
    elif saved_rng is not None:
        warn(f"the checkpoint holds RNG states of {len(saved_rng)} processes, this run has {context.world_size}: "
             "random streams are reseeded, so the run continues consistently but not bit-exactly")
        seed_everything(derive_seed(args.seed, context.rank, state.epoch, state.step))
    return state


def announce(args: argparse.Namespace, context: distributed.DistributedContext, data: RunData,
             save_folder: Path) -> None:
    """What the run is about to do, and which checkpoint it chooses."""
    info(f"Training {args.model} on {args.dataset} ({len(data.train_set)} images, {args.num_classes} classes): "
         f"{args.epochs} epochs of {data.steps} steps of {args.episodes_per_step} episode(s) "
         f"({args.episodes_per_process} on each of {context.world_size} process(es)) on {context.device.type}, "
         f"amp {args.amp}; saving to {save_folder}")
    if get_recipe(args.dataset).trains_on_val:
        info(f"{args.dataset} trains on its val classes too: no checkpoint is chosen on val; the final model "
             f"({save_folder / LAST_CHECKPOINT}) is the one to evaluate, as published")
    elif data.val_set is not None:
        precision = "fp32" if args.validation_amp == "off" else args.validation_amp
        info(f"Validation on {args.val_split} in {precision} (as eval_bml.py evaluates) chooses "
             f"{save_folder / BEST_CHECKPOINT}")


def run_epochs(args: argparse.Namespace, parts: TrainComponents, state: TrainingState, data: RunData,
               logger: RunLogger, stop: StopOnSignal, rank: int) -> tuple[TrainingOutcome | None, dict[str, float]]:
    """Train the remaining epochs. Returns (the outcome when a signal stopped the run, else None; the last
    validation results)."""
    last_path = Path(args.save_folder) / LAST_CHECKPOINT
    last_validation: dict[str, float] = {}
    try:
        batches = build_training_loader(args, data.train_set, (state.epoch + 1, state.epoch_step), data.steps, rank,
                                        parts.device)
        for epoch in range(state.epoch + 1, args.epochs + 1):
            set_epoch_lr(args, parts.optimizer, epoch - 1)
            loader = islice(batches, data.steps - state.epoch_step)
            result = train_one_epoch(parts, loader, state, epoch=epoch, epochs=args.epochs,
                                     steps_per_epoch=data.steps, loss_settings=loss_settings(args, epoch),
                                     stop_requested=stop.requested, logger=logger, print_freq=args.print_freq,
                                     is_main=distributed.is_main_process())
            if result.interrupted:
                saved = save_interrupted(args, parts, state, last_path)
                return _stopped(args, agreed_stop(stop, parts.device), last_path, parts.model, state, saved), {}
            last_validation = end_epoch(args, parts, state, epoch, result.stats, data.val_set, logger) or last_validation
            exit_code = agreed_stop(stop, parts.device)
            if exit_code:   # also after the last epoch: the signal's exit code, never 0
                return _stopped(args, exit_code, last_path, parts.model, state), last_validation
    except NonFiniteLossError as problem:
        kept = f"the last good checkpoint is {last_path}" if last_path.is_file() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"{problem}\nTraining stopped; {kept}. Lower --lr (this run: {args.lr:g}), try "
                                 "--amp off, or check the data; then resume with this command, adding the --lr "
                                 "or --amp you choose:\n  " + resume_command(args, STOP_CAUSING_FLAGS)) from problem
    return None, last_validation


def save_interrupted(args: argparse.Namespace, parts: TrainComponents, state: TrainingState, last_path: Path) -> bool:
    """`last.pth` after the step a signal interrupted (collective); False when it could not be written."""
    checkpoint = checkpoint_state(args, parts, state)
    if not distributed.is_main_process():
        return True
    try:
        save_checkpoint(last_path, checkpoint)
    except OutputError as problem:   # still stop as the signal asks, with its exit code
        warn(str(problem))
        return False
    return True


def finish(args: argparse.Namespace, parts: TrainComponents, state: TrainingState, data: RunData,
           last_validation: dict[str, float], save_folder: Path, is_main: bool) -> TrainingOutcome:
    """After the last epoch: calibration on val, the curves, and what to do next."""
    last_path = save_folder / LAST_CHECKPOINT
    info(f"Done: {args.epochs} epochs. Last checkpoint: {last_path}")
    if data.val_set is not None:   # the main process: temperatures fitted on val, stored in last.pth and best.pth
        info(calibrate_checkpoints([last_path, save_folder / BEST_CHECKPOINT], data.val_set, args.n_ways,
                                   args.n_shots, args.n_queries, args.val_episodes, parts.device, args.amp,
                                   args.num_workers))
    if last_validation:
        info(f"Validation accuracy ({args.n_ways}-way {args.n_shots}-shot, {args.val_episodes} episodes of the val "
             f"split): last {last_validation['acc']:.2f} +- {last_validation['ci95']:.2f}%, best "
             f"{state.max_accuracy:.2f}% at epoch {state.best_epoch}: {save_folder / BEST_CHECKPOINT}")
    info(f"Log: {save_folder / 'log.txt'}, TensorBoard: {save_folder / 'tensorboard'}")
    if is_main:
        write_curves(save_folder)
    info(next_steps(args, save_folder / (BEST_CHECKPOINT if state.best_epoch else LAST_CHECKPOINT)))
    return TrainingOutcome(0, parts.model, state, save_folder)


def write_curves(save_folder: Path) -> None:
    """curves.png in the run folder (`bml.plot`); a plotting failure only warns: the run itself is done."""
    try:
        from bml.plot import CURVES, plot_runs   # imported here: matplotlib would slow down every `--help`

        info(f"Curves: {plot_runs([save_folder], save_folder / CURVES)}")
    except Exception as problem:  # noqa: BLE001 (whatever goes wrong in drawing, the trained model stands)
        warn(f"could not draw the training curves ({type(problem).__name__}: {problem}); "
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
        except EvaluationError as problem:   # the epoch's training is still saved below
            failure = f"validation after epoch {epoch} failed: {problem}"
    if validation:
        if validation["acc"] > state.max_accuracy:
            state.max_accuracy, state.best_epoch = validation["acc"], epoch
        stats.update({f"val_{key}": value for key, value in validation.items()})
        logger.scalars({f"val/{key}": value for key, value in validation.items()}, state.step)
        info(f"Epoch {epoch}: validation accuracy {validation['acc']:.2f} +- {validation['ci95']:.2f}% "
             f"(best {state.max_accuracy:.2f}% at epoch {state.best_epoch})")
    check_weights_bounded(parts.model, state.initial_weight_norm, epoch)
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
