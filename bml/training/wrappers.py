"""What wraps the model for training: the loss as the forward pass, DDP, torch.compile, the optimiser and
its per-epoch learning rate."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bml.recipes import lr_factor
from bml.utils import distributed
from bml.utils.messages import warn


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
