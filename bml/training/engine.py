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

from bml.evaluation import EmbeddingOptions, evaluate_heads
from bml.scoring import COMBINED, PROTO
from bml.training.guard import NonFiniteLossError
from bml.training.state import TrainComponents, TrainingState
from bml.utils.distributed import all_reduce_sum, get_world_size
from bml.utils.logger import RunLogger, SmoothedValue
from bml.utils.messages import info

STEP_LOG_POINTS_PER_EPOCH = 10
"""Points of `log_steps.txt` per epoch (each the mean over its steps): enough for a curve of a short run."""
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


def train_one_epoch(parts: TrainComponents, loader: Iterable, state: TrainingState, *, epoch: int,
                    epochs: int, steps_per_epoch: int, loss_settings: dict, stop_requested: Callable[[], bool],
                    logger: RunLogger, print_freq: int, is_main: bool) -> EpochResult:
    """Train over the remaining steps of epoch `epoch` (1-based), or until a stop is requested.

    `loader` yields (images, labels) of shape (episodes_per_process, B, 3, S, S) and
    (episodes_per_process, B), starting at step `state.epoch_step`. Non-finite losses and stop
    requests are agreed on by all processes at each step (one all-reduce, which also averages the
    logged loss terms), so they all leave after the same step.
    Raises NonFiniteLossError before applying a step whose loss is NaN or infinite.
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
    optimizer.zero_grad(set_to_none=True)
    step_start = time.perf_counter()
    for images, labels in loader:
        names, terms = forward_backward(parts, images, labels, loss_settings, state.step)
        non_finite = (~torch.isfinite(terms).all()).float().reshape(1)
        stop = torch.tensor([float(stop_requested())], device=parts.device)
        status = all_reduce_sum(torch.cat([terms, non_finite, stop])).tolist()
        values = [value / world_size for value in status[:len(names)]]
        where = f"epoch {epoch}, step {state.epoch_step + 1}/{steps_per_epoch} (global step {state.step + 1})"
        if status[-2] > 0 and not scaler.is_enabled():
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite loss at {where}: {_format_terms(names, values)}. "
                                     "This step was not applied.")
        logged = dict(zip(names, values))
        if parts.clip_grad:
            scaler.unscale_(optimizer)   # clip the unscaled gradients (unscale_ is a no-op without fp16)
            grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad).item()
            if math.isfinite(grad_norm):   # an fp16 overflow step is skipped by the scaler, not logged
                logged["grad_norm"] = grad_norm   # before clipping: how often and how hard the clip binds
        scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            skipped_in_a_row = skipped_in_a_row + 1 if scaler.get_scale() < scale_before else 0
            if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPPED_STEPS:
                raise NonFiniteLossError(f"the fp16 gradient scaler skipped {skipped_in_a_row} steps in a row, up "
                                         f"to {where}: the gradients keep overflowing; last loss terms "
                                         f"{_format_terms(names, values)}.")
        state.step += 1
        state.epoch_step += 1

        now = time.perf_counter()
        step_seconds, step_start = max(now - step_start, 1e-9), now
        step_images = images.shape[0] * images.shape[1] * world_size
        throughput.update(step_images / step_seconds)
        for name, value in logged.items():
            meters.setdefault(name, SmoothedValue()).update(value)
        for sums in (state.epoch_sums, since_step_log):
            accumulate(sums, logged, step_images, step_seconds)
        lr = optimizer.param_groups[0]["lr"]
        progress.set_postfix({**{name: f"{m.median:.3f}" for name, m in meters.items()},
                              "lr": f"{lr:.2g}", "img/s": f"{throughput.median:.0f}"}, refresh=False)
        progress.update(1)
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
        if status[-1] > 0:
            progress.close()
            return EpochResult(epoch_stats(state, optimizer), interrupted=True)
    progress.close()
    return EpochResult(epoch_stats(state, optimizer), interrupted=False)


def accumulate(sums: dict[str, float], logged: dict[str, float], images: int, seconds: float) -> None:
    """Add one step's metrics to running sums (also counting its steps, images and seconds)."""
    for name, value in logged.items():
        sums[name] = sums.get(name, 0.0) + value
    sums["steps"] = sums.get("steps", 0) + 1
    sums["images"] = sums.get("images", 0) + images
    sums["seconds"] = sums.get("seconds", 0.0) + seconds


def mean_stats(sums: dict[str, float]) -> dict[str, float]:
    """Per-step mean of each loss term (and of the gradient norm, when clipping) and the images per second,
    from running sums (`accumulate`)."""
    steps = max(sums.get("steps", 0), 1)
    stats = {f"train_{name}": value / steps for name, value in sums.items()
             if name not in ("steps", "images", "seconds")}
    stats["train_images_per_s"] = sums.get("images", 0) / max(sums.get("seconds", 0.0), 1e-9)
    return stats


def epoch_stats(state: TrainingState, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The means over the epoch's steps so far (`mean_stats`) and the lr."""
    return {**mean_stats(state.epoch_sums), "lr": optimizer.param_groups[0]["lr"]}


def evaluate(model: nn.Module, dataset, *, way: int, shot: int, query: int, episodes: int, seed: int,
             device: torch.device, amp: str = "off", num_workers: int = 0, progress: bool = False,
             heads: Sequence[str] = (PROTO,), base_dataset=None) -> dict[str, float]:
    """Validation accuracy (%) with its 95% interval: 'acc'/'ci95' of the model's prediction (BML: the
    sum of both views), 'acc_<view>' of each view alone and, for BML, 'acc_bml_scaled' of the scaled vote;
    for every other head of `heads` (`bml.scoring.HEADS`; `base_dataset`: the training split, for cl2n),
    'acc_<head>' of its prediction and 'acc_<head>_<vote>' of the other votes.

    Uses the fast protocol of `bml.evaluation` (embed the split once, score every episode of every head
    from the cache); the model's training mode is restored afterwards.
    """
    head_results = evaluate_heads(model, dataset, way, shot, query, episodes, seeds=[seed],
                                  heads=list(dict.fromkeys([PROTO, *heads])), base_dataset=base_dataset,
                                  options=EmbeddingOptions(device=device, amp=amp, num_workers=num_workers,
                                                           progress=progress))
    results = head_results.pop(PROTO)
    summary = {"acc": results[COMBINED]["acc"], "ci95": results[COMBINED]["ci95"]}
    summary.update({f"acc_{view}": results[view]["acc"] for view in results if view != COMBINED})
    for head, results in head_results.items():
        summary.update({f"acc_{head}" + ("" if vote == COMBINED else f"_{vote}"): result["acc"]
                        for vote, result in results.items()})
    return summary
