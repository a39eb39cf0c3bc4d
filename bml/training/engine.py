"""One training epoch and one validation pass, shared by BML and both baselines.

A training step is `episodes_per_process` separate forward/backward passes on each process (each
its own episode or batch, so BatchNorm statistics stay per episode) with their gradients averaged,
then one optimiser step. Under DDP the gradients are also averaged over processes, so one step
averages the recipe's `episodes_per_step` episodes (2, as on the published two GPUs) however many
processes share them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from bml.datasets import EpisodeRule
from bml.evaluation import EmbeddingOptions, evaluate_heads
from bml.scoring import COMBINED, PROTO
from bml.training.guard import NonFiniteLossError
from bml.training.state import TrainComponents, TrainingState
from bml.utils.distributed import all_reduce_sum, get_world_size
from bml.utils.logger import RunLogger, SmoothedValue
from bml.utils.messages import info

STEP_LOG_POINTS_PER_EPOCH = 10
"""Points of `log_steps.txt` per epoch (each the mean over its steps): enough for a curve of a short run."""
STATUS_EVERY = 10
"""Steps between two reads of the training status on the host (besides the logging steps and the end of an
epoch): between them the host queues steps without waiting for the device. A non-finite loss or a stop request
is acted on at the next read."""
DATA_WAIT = "data_wait_s"
"""The seconds the trainer waited for its batches (the loader's share of the step time)."""
MAX_CONSECUTIVE_SKIPPED_STEPS = 20
"""With fp16 the gradient scaler skips steps whose gradients overflow; this many in a row means
the loss itself has diverged."""


@dataclass
class EpochResult:
    stats: dict[str, float]
    interrupted: bool


def _format_terms(names: list[str], values: list[float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values))


def forward_backward(parts: TrainComponents, images: torch.Tensor, labels: torch.Tensor, loss_settings: dict,
                     step: int) -> tuple[list[str], torch.Tensor]:
    """Backward of each of the step's episodes (loss / episodes, so gradients are averaged).

    Returns the loss names and their values averaged over the episodes (a tensor on the device).
    DDP synchronises the gradients on the last episode only.
    """
    slots = images.shape[0]
    memory_format = torch.channels_last if parts.channels_last else torch.contiguous_format
    averaged = None
    for slot in range(slots):
        parts.model.dropblock_step = parts.dropblock_count(step)   # every episode of a step: the same rate
        last_slot = slot == slots - 1
        with contextlib.nullcontext() if parts.ddp is None or last_slot else parts.ddp.no_sync():
            batch = images[slot].to(parts.device, non_blocking=True, memory_format=memory_format)
            batch_labels = labels[slot].to(parts.device, non_blocking=True)
            with torch.autocast(parts.device.type, dtype=parts.amp_dtype or torch.float32,
                                enabled=parts.amp_dtype is not None):
                losses = parts.loss_module(batch, batch_labels, loss_settings)
            parts.scaler.scale(losses["total"] / slots).backward()
        terms = torch.stack([value.detach().float() for value in losses.values()]) / slots
        averaged = terms if averaged is None else averaged + terms
    parts.model.dropblock_step = parts.dropblock_count(step + 1)
    return list(losses), averaged


@dataclass
class PendingStep:
    """A step whose status is still on the device: its loss terms (and gradient norm, when clipping) in one
    tensor, with what the host knows of it."""

    status: torch.Tensor
    epoch_step: int
    step: int
    images: int
    data_wait: float


def train_one_epoch(parts: TrainComponents, loader: Iterable, state: TrainingState, *, epoch: int,
                    epochs: int, steps_per_epoch: int, loss_settings: dict, stop_requested: Callable[[], bool],
                    logger: RunLogger, print_freq: int, is_main: bool) -> EpochResult:
    """Train over the remaining steps of epoch `epoch` (1-based), or until a stop is requested.

    `loader` yields (images, labels) of shape (episodes_per_process, B, 3, S, S) and
    (episodes_per_process, B), starting at step `state.epoch_step`. A step makes no blocking host-device
    transfer: its loss terms stay on the device until the status is read, every STATUS_EVERY steps, at
    each logging step and at the end of the epoch. Then one all-reduce, whose result the host waits for,
    averages the terms of those steps over the processes and tells whether a loss was non-finite or a stop
    was requested anywhere, so that every process leaves after the same step.
    Raises NonFiniteLossError at that read when a step's loss was NaN or infinite (naming the first such
    step), before anything from it on is logged or saved.
    """
    optimizer, scaler = parts.optimizer, parts.scaler
    parts.model.train()
    world_size = get_world_size()
    meters: dict[str, SmoothedValue] = {}
    throughput = SmoothedValue()
    skipped_in_a_row = 0
    show_bar = is_main and sys.stderr.isatty()
    step_log_every = max(1, steps_per_epoch // STEP_LOG_POINTS_PER_EPOCH)
    since_step_log: dict[str, float] = {}
    progress = tqdm(total=steps_per_epoch, initial=state.epoch_step, desc=f"Epoch {epoch}/{epochs}",
                    disable=not show_bar, dynamic_ncols=True, file=sys.stderr)
    stop_flag = torch.zeros(1, device=parts.device)   # filled on the host at each read, copied by no one
    pending: list[PendingStep] = []
    names: list[str] = []
    last_read = time.perf_counter()

    def read_pending(stop: bool) -> bool:
        nonlocal last_read
        stop_flag.fill_(float(stop))
        requested = read_status(pending, names, stop_flag, where=(epoch, steps_per_epoch),
                                non_finite_stops=not scaler.is_enabled(), since=last_read,
                                sums=(state.epoch_sums, since_step_log), meters=meters, throughput=throughput)
        last_read = time.perf_counter()
        return requested

    optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)
    while True:
        wait_start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        data_wait = time.perf_counter() - wait_start
        images, labels = batch
        names, terms = forward_backward(parts, images, labels, loss_settings, state.step)
        status = [terms]
        if parts.clip_grad:
            scaler.unscale_(optimizer)   # clip the unscaled gradients (unscale_ is a no-op without fp16)
            status.append(torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad).reshape(1))
        scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.step(optimizer)   # with fp16 the scaler decides on the host whether to skip: one wait a step
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            skipped_in_a_row = skipped_in_a_row + 1 if scaler.get_scale() < scale_before else 0
        state.step += 1
        state.epoch_step += 1
        pending.append(PendingStep(torch.cat(status).float(), state.epoch_step, state.step,
                                   images.shape[0] * images.shape[1] * world_size, data_wait))
        progress.update(1)
        logging_step = state.epoch_step % step_log_every == 0 or state.epoch_step % print_freq == 0
        if not (logging_step or state.epoch_step % STATUS_EVERY == 0 or state.epoch_step == steps_per_epoch
                or skipped_in_a_row >= MAX_CONSECUTIVE_SKIPPED_STEPS):
            continue
        stop = read_pending(stop_requested())
        if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPPED_STEPS:
            raise NonFiniteLossError(f"the fp16 gradient scaler skipped {skipped_in_a_row} steps in a row, up "
                                     f"to {_where(epoch, state.epoch_step, steps_per_epoch, state.step)}: the "
                                     "gradients keep overflowing; last loss terms "
                                     + _format_terms(names, [meters[name].recent[-1] for name in names]) + ".")
        lr = optimizer.param_groups[0]["lr"]
        progress.set_postfix({**{name: f"{m.median:.3f}" for name, m in meters.items()},
                              "lr": f"{lr:.2g}", "img/s": f"{throughput.median:.0f}"}, refresh=False)
        if is_main and (state.epoch_step % step_log_every == 0 or state.epoch_step == steps_per_epoch):
            logger.steps({"epoch": epoch - 1 + state.epoch_step / steps_per_epoch, "step": state.step,
                          **mean_stats(since_step_log), "lr": lr})
            since_step_log.clear()
        if is_main and (state.epoch_step % print_freq == 0 or state.epoch_step == steps_per_epoch):
            logger.scalars({**{f"train/{name}": m.median for name, m in meters.items()},
                            "train/lr": lr, "train/images_per_s": throughput.median}, state.step)
            if not show_bar:
                info(f"Epoch [{epoch}/{epochs}] step [{state.epoch_step}/{steps_per_epoch}]  "
                      + "  ".join(f"{name} {m.median:.4f} ({m.global_avg:.4f})" for name, m in meters.items())
                      + f"  lr {lr:.3g}  {throughput.median:.0f} img/s")
        if stop:
            progress.close()
            return EpochResult(epoch_stats(state, optimizer), interrupted=True)
    if pending:   # a loader that ended before the epoch did
        read_pending(False)
    progress.close()
    return EpochResult(epoch_stats(state, optimizer), interrupted=False)


def _where(epoch: int, epoch_step: int, steps_per_epoch: int, step: int) -> str:
    return f"epoch {epoch}, step {epoch_step}/{steps_per_epoch} (global step {step})"


def read_status(pending: list[PendingStep], names: list[str], stop_flag: torch.Tensor, *, where: tuple[int, int],
                non_finite_stops: bool, since: float, sums: Sequence[dict[str, float]],
                meters: dict[str, SmoothedValue], throughput: SmoothedValue) -> bool:
    """Read the steps of `pending` on the host (the one wait for the device, and one all-reduce), add them to
    the meters and running sums and empty `pending`; their time is shared out evenly from `since` (the end of
    the previous read). Returns whether a stop was requested on any process.

    Raises NonFiniteLossError at the first step whose loss is not finite on some process (`non_finite_stops`;
    with fp16 the gradient scaler skips those steps instead), before any of them is counted.
    """
    world_size = get_world_size()
    status = all_reduce_sum(torch.cat([step.status for step in pending] + [stop_flag])).tolist()
    step_seconds = max(time.perf_counter() - since, 1e-9) / len(pending)   # the device's time, after the wait
    width = len(status[:-1]) // len(pending)
    rows = [[value / world_size for value in status[index * width:(index + 1) * width]] for index in range(len(pending))]
    for step, values in zip(pending, rows):
        if non_finite_stops and not all(map(math.isfinite, values[:len(names)])):
            raise NonFiniteLossError(f"non-finite loss at {_where(where[0], step.epoch_step, where[1], step.step)}: "
                                     f"{_format_terms(names, values)}. Nothing from this step on was saved.")
    for step, values in zip(pending, rows):
        logged = dict(zip(names, values))
        if len(values) > len(names) and math.isfinite(values[-1]):   # an fp16 overflow step is skipped, not logged
            logged["grad_norm"] = values[-1]   # before clipping: how often and how hard the clip binds
        throughput.update(step.images / step_seconds)
        for name, value in logged.items():
            meters.setdefault(name, SmoothedValue()).update(value)
        for running in sums:
            accumulate(running, logged, step.images, step_seconds, step.data_wait)
    pending.clear()
    return status[-1] > 0


def accumulate(sums: dict[str, float], logged: dict[str, float], images: int, seconds: float,
               data_wait: float) -> None:
    """Add one step's metrics to running sums (also counting its steps, images, seconds and the seconds it
    waited for its batch)."""
    for name, value in logged.items():
        sums[name] = sums.get(name, 0.0) + value
    sums["steps"] = sums.get("steps", 0) + 1
    sums["images"] = sums.get("images", 0) + images
    sums["seconds"] = sums.get("seconds", 0.0) + seconds
    sums[DATA_WAIT] = sums.get(DATA_WAIT, 0.0) + data_wait


def mean_stats(sums: dict[str, float]) -> dict[str, float]:
    """Per-step mean of each loss term (and of the gradient norm, when clipping), the images per second, and
    the seconds spent waiting for batches with their fraction of the steps' time, from running sums
    (`accumulate`)."""
    steps = max(sums.get("steps", 0), 1)
    seconds = max(sums.get("seconds", 0.0), 1e-9)
    stats = {f"train_{name}": value / steps for name, value in sums.items()
             if name not in ("steps", "images", "seconds", DATA_WAIT)}
    stats["train_images_per_s"] = sums.get("images", 0) / seconds
    stats[DATA_WAIT] = sums.get(DATA_WAIT, 0.0)
    stats["data_wait_fraction"] = sums.get(DATA_WAIT, 0.0) / seconds
    return stats


def epoch_stats(state: TrainingState, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The means over the epoch's steps so far (`mean_stats`) and the lr."""
    return {**mean_stats(state.epoch_sums), "lr": optimizer.param_groups[0]["lr"]}


def evaluate(model: nn.Module, dataset, *, way: int, shot: int, query: int, episodes: int, seed: int,
             device: torch.device, amp: str = "off", num_workers: int = 0, progress: bool = False,
             heads: Sequence[str] = (PROTO,), base_dataset=None, rule: EpisodeRule = EpisodeRule()) -> dict[str, float]:
    """Validation accuracy (%) with its 95% interval: 'acc'/'ci95' of the model's prediction (BML: the
    sum of both views), 'acc_<view>' of each view alone and, for BML, 'acc_bml_scaled' of the scaled vote;
    for every other head of `heads` (`bml.scoring.HEADS`; `base_dataset`: the training split, for cl2n),
    'acc_<head>' of its prediction and 'acc_<head>_<vote>' of the other votes. `rule` narrows the episodes
    (`bml.datasets.EpisodeRule`).

    Uses the fast protocol of `bml.evaluation` (embed the split once, score every episode of every head
    from the cache); the model's training mode is restored afterwards.
    """
    head_results = evaluate_heads(model, dataset, way, shot, query, episodes, seeds=[seed],
                                  heads=list(dict.fromkeys([PROTO, *heads])), base_dataset=base_dataset, rule=rule,
                                  options=EmbeddingOptions(device=device, amp=amp, num_workers=num_workers,
                                                           progress=progress))
    results = head_results.pop(PROTO)
    summary = {"acc": results[COMBINED]["acc"], "ci95": results[COMBINED]["ci95"]}
    summary.update({f"acc_{view}": results[view]["acc"] for view in results if view != COMBINED})
    for head, results in head_results.items():
        summary.update({f"acc_{head}" + ("" if vote == COMBINED else f"_{vote}"): result["acc"]
                        for vote, result in results.items()})
    return summary
