"""The divergence guard: a run whose loss or weights stop being finite, or whose weights grow without
bound, stops before the step or epoch is saved."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

WEIGHT_GROWTH_LIMIT = 1e6
"""Weights whose norm grows past this many times their norm at the start have diverged."""
STOP_CAUSING_FLAGS = ("--lr", "--amp", "--amp_opt_level")
"""Flags the advice after a diverged run asks to change, so its resume command leaves them out."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the weights of that step were not applied."""


def weight_norm(model: nn.Module) -> float:
    """The norm of all floating-point parameters together."""
    norms = torch._foreach_norm([p.detach().float() for p in model.parameters()])
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def check_weights_bounded(model: nn.Module, initial_weight_norm: float, epoch: int) -> None:
    """Stop like a non-finite loss when the weights are non-finite or have grown past WEIGHT_GROWTH_LIMIT
    times their norm at the start (before this epoch is saved)."""
    norm = weight_norm(model)
    if not np.isfinite(norm) or norm > WEIGHT_GROWTH_LIMIT * initial_weight_norm:
        raise NonFiniteLossError(f"after epoch {epoch} the weights' norm is {norm:.4g}, more than "
                                 f"{WEIGHT_GROWTH_LIMIT:g} times its value at the start ({initial_weight_norm:.4g}): "
                                 "training has diverged. This epoch was not saved.")
