"""How long a run takes: a rough projection from a stated throughput table (the dry-run plan), and a
measurement of a few real steps of the run's shape on synthetic images (`--estimate`).

Both count training steps only: validation, calibration and data loading come on top (loading is
usually hidden behind the steps by the loader workers).
"""

from __future__ import annotations

import argparse
import time

import torch

from bml.methods import get_method

REFERENCE_IMAGES_PER_SECOND = {"cpu": 19.0, "cuda": 500.0}
"""Training images per second (forward and backward) of the published model (ResNet-12, width 1, 84 px, fp32)
per device type, for the dry-run projection. cpu: the miniImageNet recipe (18 million training images) takes
about 11 days on a 2-core machine; cuda: a rough figure for one V100-class GPU. The cost of an image scales
with width^2 x (image size / 84)^2. `--estimate` measures the real figure."""
REFERENCE_IMAGE_SIZE = 84
WARN_AFTER_HOURS = 24.0
WARMUP_STEPS = 2      # not timed: first-call allocations, cuDNN autotuning, compilation
TIMED_STEPS = 5
ESTIMATE_NUM_CLASSES = 64
"""Base classes of the classifier when the data set is not read (its size barely changes a step's time)."""


def images_per_step(args: argparse.Namespace) -> int:
    """Images of one step over all processes: every episode (or batch) with its extra shuffled images."""
    method = get_method(args)
    if method.batches:
        per_episode = args.batch_size
    else:
        extra = getattr(args, method.extra_batch_flag) if method.extra_batch_flag else 0
        per_episode = args.n_train_ways * (args.n_train_shots + args.n_train_queries) + extra
    return per_episode * args.episodes_per_step


def projected_steps(args: argparse.Namespace, train_images: int | None) -> int | None:
    """Optimiser steps of the whole run (None: the global baseline's steps need the image count)."""
    if get_method(args).batches:
        return None if train_images is None else args.epochs * (train_images // args.batch_size)
    return args.epochs * args.episodes_per_epoch


def rough_projection(args: argparse.Namespace, device_type: str, world_size: int,
                     train_images: int | None) -> dict | None:
    """The run's training time from `REFERENCE_IMAGES_PER_SECOND` (None when the steps are unknown)."""
    steps = projected_steps(args, train_images)
    if steps is None:
        return None
    cost = args.width ** 2 * (args.image_size / REFERENCE_IMAGE_SIZE) ** 2
    rate = REFERENCE_IMAGES_PER_SECOND.get(device_type, REFERENCE_IMAGES_PER_SECOND["cpu"]) * world_size / cost
    images = steps * images_per_step(args)
    return {"training_images": images, "assumed_images_per_s": round(rate, 1),
            "hours": round(images / rate / 3600, 2),
            "rule": "bml.training.estimate.REFERENCE_IMAGES_PER_SECOND, scaled by width^2 x (image size / 84)^2; "
                    "measure with --estimate"}


def synthetic_step_batch(args: argparse.Namespace, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images and labels of one process's step: (episodes, B, 3, S, S) and (episodes, B)."""
    per_process = images_per_step(args) // args.episodes_per_step
    shape = (args.episodes_per_process, per_process)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(*shape, 3, args.image_size, args.image_size, generator=generator)
    return images, torch.randint(0, num_classes, shape, generator=generator)


def time_steps(step, device: torch.device) -> float:
    """Seconds per call of `step()` over `TIMED_STEPS` calls after `WARMUP_STEPS` untimed ones."""
    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP_STEPS):
        step()
    synchronise()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    synchronise()
    return (time.perf_counter() - start) / TIMED_STEPS


def measured_projection(args: argparse.Namespace, seconds_per_step: float, train_images: int | None,
                        peak_bytes: int | None) -> dict:
    """The `--estimate` result: the measured step time, projected over the run's steps."""
    steps = projected_steps(args, train_images)
    return {
        "device": args.device, "world_size": args.world_size, "images_per_step": images_per_step(args),
        "seconds_per_step": round(seconds_per_step, 4),
        "images_per_s": round(images_per_step(args) / seconds_per_step, 1),
        "steps": steps, "projected_hours": None if steps is None else round(steps * seconds_per_step / 3600, 3),
        "peak_gpu_memory_gib": None if peak_bytes is None else round(peak_bytes / 2**30, 3),
        "measured": f"{TIMED_STEPS} steps after {WARMUP_STEPS} warm-up steps, synthetic images (no data read, no "
                    "augmentation); validation and calibration not included",
    }
