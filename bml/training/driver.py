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
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from bml.calibration import calibrate_checkpoints
from bml.cli import episode_rule
from bml.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from bml.datasets import DatasetError
from bml.evaluation import EvaluationError
from bml.models import build_model
from bml.training.engine import evaluate, forward_backward, train_one_epoch
from bml.training.estimate import (ESTIMATE_NUM_CLASSES, TIMED_STEPS, WARMUP_STEPS, images_per_step,
                                   measured_projection, synthetic_step_batch, time_steps)
from bml.training.guard import STOP_CAUSING_FLAGS, NonFiniteLossError, check_weights_bounded, weight_norm
from bml.training.init_from import load_init_weights
from bml.training.processes import agreed_stop, on_main_process
from bml.training.run_data import RunData, open_data
from bml.training.run_folder import BEST_CHECKPOINT, LAST_CHECKPOINT, claim_run_folder, next_steps, resume_command
from bml.training.settings import (SettingsError, finish_settings, loss_settings, record_compile_status,
                                   record_run_folder, record_training_data, run_plan, run_recipe)
from bml.training.signals import StopOnSignal
from bml.training.state import TrainComponents, TrainingState, checkpoint_state, restore_saved_rng, resume
from bml.training.step_plan import build_training_loader, dropblock_counter
from bml.training.wrappers import (COMPILE_REPORT_STEPS, build_optimizer, report_compile_after, set_epoch_lr,
                                   wrap_for_training)
from bml.utils import distributed
from bml.utils.device import AMP_DTYPES, compute_precision, configure_tf32
from bml.utils.io import OutputError
from bml.utils.logger import RunLogger
from bml.utils.messages import error, info, log_to, progress_line, warn
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
        if args.estimate:
            return estimate_run(args, context)
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


def estimate_run(args: argparse.Namespace, context: distributed.DistributedContext) -> TrainingOutcome:
    """`--estimate`: time a few steps of the run's shape on its device with synthetic images and print the
    projection (`bml.training.estimate`) as one JSON object; reads no data (an image folder's file listing
    aside), writes nothing."""
    for warning in finish_settings(args, context):
        warn(warning)
    facts = getattr(args, "folder_facts", None) or {}
    record_training_data(args, facts.get("train_classes", ESTIMATE_NUM_CLASSES))
    progress_line(f"Estimating: {WARMUP_STEPS} warm-up and {TIMED_STEPS} timed training steps of "
                  f"{images_per_step(args)} synthetic images on {context.device}")
    parts = build_components(args, context, facts.get("train_images") or images_per_step(args))
    parts.model.train()
    images, labels = synthetic_step_batch(args, args.num_classes)
    settings = loss_settings(args, 1)

    def step() -> None:
        forward_backward(parts, images, labels, settings, 0)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)

    cuda = context.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(context.device)
    seconds = time_steps(step, context.device)
    peak = torch.cuda.max_memory_allocated(context.device) if cuda else None
    if context.is_main_process:
        print(json.dumps(measured_projection(args, seconds, facts.get("train_images"), peak), indent=2))
    return TrainingOutcome(0)


def _train(args: argparse.Namespace, context: distributed.DistributedContext,
           resources: contextlib.ExitStack) -> TrainingOutcome:
    explicit_folder = args.run_folder is not None
    for warning in finish_settings(args, context):
        warn(warning)
    info(f"Reading {args.dataset}: the training split" + (f" and {args.val_split}" if args.val_split else ""))
    data = open_data(args, context)   # before the run folder: a run that cannot read its data leaves nothing
    save_folder = prepare_run(args, context, resources, explicit_folder)
    last_path = save_folder / LAST_CHECKPOINT
    if args.is_continue and finished_run(last_path, args.epochs):
        best = save_folder / BEST_CHECKPOINT
        info(f"--is_continue: {last_path} has finished all {args.epochs} epochs; nothing to continue (raise --epochs "
             f"to train on). {next_steps(args, best if best.is_file() else last_path)}")
        return TrainingOutcome(0, save_folder=save_folder)
    parts = build_components(args, context, len(data.train_set),
                             init_weights=not (args.is_continue and last_path.is_file()))
    state = restore_or_start(args, parts, context, last_path, data.steps)
    fresh = not (args.is_continue and last_path.is_file())
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
    """The run folder claimed and locked (`explicit_folder`: given with --run_folder; after the settings and the
    data are checked: a run that cannot start claims nothing), the random streams seeded, the GPU configured."""
    folder = on_main_process(lambda: claim_run_folder(args, explicit_folder, resources))
    record_run_folder(args, folder)
    log_to(folder / MESSAGES_FILE)
    seed_everything(args.seed + context.rank)
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        configure_tf32(args.tf32)
    return Path(args.save_folder)


def finished_run(last_path: Path, epochs: int) -> bool:
    """Whether the run's `last.pth` has done exactly `epochs` (an --is_continue would only recalibrate it). A
    checkpoint past `epochs`, or with counters a run does not write, is for `resume` to refuse."""
    if not last_path.is_file():
        return False
    saved = read_checkpoint(last_path).get("training_state")
    return isinstance(saved, dict) and saved.get("epoch") == epochs and saved.get("epoch_step") == 0


def build_components(args: argparse.Namespace, context: distributed.DistributedContext, train_images: int,
                     init_weights: bool = True) -> TrainComponents:
    """The model on its device (with `init_weights`, from --init_from's checkpoint when given; a resumed run
    loads its own), its optimiser, gradient scaler, training wrappers and DropBlock counter."""
    device = context.device
    model = build_model(args)
    if args.init_from and init_weights:
        info(load_init_weights(model, args.init_from).describe())
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    loss_module, ddp = wrap_for_training(args, model, context)
    return TrainComponents(model=model, loss_module=loss_module, ddp=ddp, optimizer=optimizer, scaler=scaler,
                           device=device, amp_dtype=AMP_DTYPES[args.amp], channels_last=args.channels_last,
                           clip_grad=args.clip_grad,
                           dropblock_count=dropblock_counter(args, train_images))


def restore_or_start(args: argparse.Namespace, parts: TrainComponents, context: distributed.DistributedContext,
                     last_path: Path, steps: int) -> TrainingState:
    """The counters of the run: those of `last_path` with `--is_continue` (weights, optimiser and random
    streams restored too), else fresh ones."""
    state, saved_rng = TrainingState(), None
    if args.is_continue and last_path.is_file():
        state, saved_rng, warnings = resume(args, parts, last_path, steps)
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
         f"precision {args.precision}; saving to {save_folder}")
    if run_recipe(args).trains_on_val:
        info(f"{args.dataset} trains on its val classes too: no checkpoint is chosen on val; the final model "
             f"({save_folder / LAST_CHECKPOINT}) is the one to evaluate, as published")
    elif data.val_set is not None:
        precision = compute_precision(args.validation_amp, args.tf32, context.device)
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
        if args.compile:
            batches = report_compile_after(batches, COMPILE_REPORT_STEPS, lambda status: report_compile(args, status,
                                                                                                        logger))
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


def report_compile(args: argparse.Namespace, status: dict, logger: RunLogger) -> None:
    """Say what torch.compile made of the first steps, warn once when it fell back to eager, and keep it in
    config.json (`compile_status`)."""
    info(f"torch.compile: {status['graphs']} graph(s), {status['graph_breaks']} graph break(s), "
         f"{status['fallbacks']} fallback(s) to eager in the first {COMPILE_REPORT_STEPS} steps")
    if status["eager"]:
        warn("--compile fell back to eager: the training step runs uncompiled (see torch's warning above for why); "
             "leave --compile out to skip the attempt")
    record_compile_status(args, status)
    logger.write_config(args)


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
        info(f"Calibrating: fitting the temperatures of {last_path} and {BEST_CHECKPOINT} on {args.val_episodes} "
             f"{args.n_ways}-way {args.n_shots}-shot episodes of {args.val_split}")
        info(calibrate_checkpoints([last_path, save_folder / BEST_CHECKPOINT], data.val_set, args.n_ways,
                                   args.n_shots, args.n_queries, args.val_episodes, parts.device, args.amp,
                                   args.num_workers, progress=True, rule=episode_rule(args)))
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
        info("Drawing the training curves")
        from bml.plot import CURVES, plot_runs   # imported here: matplotlib would slow down every `--help`

        info(f"Curves: {plot_runs([save_folder], save_folder / CURVES)}")
    except Exception as problem:  # noqa: BLE001 (whatever goes wrong in drawing, the trained model stands)
        warn(f"could not draw the training curves ({type(problem).__name__}: {problem}); "
             f"draw them later with: python -m bml.plot {save_folder}")


def end_epoch(args: argparse.Namespace, parts: TrainComponents, state: TrainingState, epoch: int,
              train_stats: dict[str, float], val_set: Dataset | None, logger: RunLogger) -> dict[str, float]:
    """Validate when due (rank 0), log the epoch, write last.pth (and best.pth, epoch_<N>.pth).

    Returns the validation results, empty when there was no validation. Collective under DDP: whatever makes
    validation fail on rank 0 (an EvaluationError, out of memory, a loader worker, the data) is raised on every
    process at once, after the epoch is saved.
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
        except Exception as problem:  # noqa: BLE001 (out of memory, a loader worker, the data: every rank must hear)
            failure = f"validation after epoch {epoch} failed: {type(problem).__name__}: {problem}"
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
    rule = episode_rule(args)
    info(f"Validating on {args.val_episodes} {args.n_ways}-way {args.n_shots}-shot episodes of {args.val_split}"
         + (f" ({rule.description})" if rule.label else ""))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return evaluate(model, val_set, way=args.n_ways, shot=args.n_shots, query=args.n_queries,
                        episodes=args.val_episodes, seed=0, device=device, amp=args.validation_amp,
                        num_workers=args.num_workers, progress=True, rule=rule)


def _stopped(args: argparse.Namespace, exit_code: int, last_path: Path, model: nn.Module,
             state: TrainingState, saved: bool = True) -> TrainingOutcome:
    where = f"epoch {state.epoch + 1} after step {state.epoch_step} (global step {state.step})"
    kept = (f"saved {last_path}" if saved else
            f"could not save it; {last_path} keeps the previous state" if last_path.is_file() else
            "could not save a checkpoint")
    info(f"Stopped in {where}; {kept}. Resume with:\n  {resume_command(args)}")
    return TrainingOutcome(exit_code, model, state, Path(args.save_folder))
