"""What wraps the model for training: the loss as the forward pass, DDP, torch.compile, the optimiser and
its per-epoch learning rate."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from bml.recipes import lr_factor
from bml.utils import distributed
from bml.utils.messages import info, warn


KEEP_BUFFERS = ("forward_sync_buffers" if "forward_sync_buffers" in
                inspect.signature(nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
"""As the original (broadcast_buffers=False; torch 2.14 renames it): each process keeps the BatchNorm statistics
of its own episodes, nothing is broadcast from rank 0 before each forward pass."""


class LossForward(nn.Module):
    """Makes `model.losses` the forward pass, so that DDP (and torch.compile) wrap the loss computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, settings: dict) -> dict[str, torch.Tensor]:
        return self.model.losses(images, labels, **settings)


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with --momentum and --weight_decay, or Adam without weight decay (as the original)."""
    if args.optim == "SGD":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
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
        ddp = nn.parallel.DistributedDataParallel(loss_module, device_ids=device_ids, **{KEEP_BUFFERS: False})
        loss_module = ddp
    if args.compile:
        try:
            import torch._dynamo

            torch._dynamo.config.suppress_errors = True  # a backend failure falls back to eager, with a warning
            loss_module = torch.compile(loss_module)
            info("--compile: the first training steps compile the model (a minute or more; a step of another "
                 "shape, e.g. the last partial one, compiles again)")
        except Exception as error:  # torch.compile is unavailable on some platforms / Python versions
            warn(f"torch.compile is unavailable here ({error}); training without compilation")
    return loss_module, ddp


COMPILE_REPORT_STEPS = 2
"""Steps after which what torch.compile made of the training step is reported (the second one compiles
anew if the first specialised on something that changes every step)."""


def compile_counters() -> dict[str, int]:
    """torch.compile's running totals in this process: graphs compiled, graph breaks, and frames whose
    compilation failed and that run eagerly instead."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "fallbacks": counters["frames"]["total"] - counters["frames"]["ok"]}


def compile_report(before: dict[str, int]) -> dict:
    """What torch.compile did since the totals `before` (`compile_counters`); 'eager' when nothing was
    compiled or some frame fell back to eager."""
    status = {key: value - before[key] for key, value in compile_counters().items()}
    return {**status, "eager": status["graphs"] == 0 or status["fallbacks"] > 0}


def report_compile_after(batches: Iterable, steps: int, report: Callable[[dict], None]) -> Iterator:
    """`batches` unchanged; before the batch of step `steps + 1` is handed out (the steps before it done),
    `report(compile_report(...))` of what those steps compiled."""
    before = compile_counters()
    for index, batch in enumerate(batches):
        if index == steps:
            report(compile_report(before))
        yield batch
