"""Prototypes and squared Euclidean distances for metric-based few-shot classification."""

from __future__ import annotations

import torch


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||²`` for a (..., M, D) and b (N, D) or (..., N, D): shape (..., M, N).

    Expands ``||a||² + ||b||² - 2 a·b`` (one matmul, no (M, N, D) intermediate) in float32 with
    autocast off, clamped at 0: under bf16 the cancellation would swamp the small distances.
    """
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        a_norms = a.pow(2).sum(-1, keepdim=True)
        b_norms = b.pow(2).sum(-1).unsqueeze(-2)
        return (a_norms + b_norms - 2.0 * a @ b.transpose(-1, -2)).clamp_min(0.0)


def class_prototypes(support: torch.Tensor, way: int) -> torch.Tensor:
    """Mean support embedding per class: support (shot*way, ...) in shot-major order -> (way, ...)."""
    return support.reshape(-1, way, *support.shape[1:]).mean(0)


def prototype_logits(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Minus the squared Euclidean distance of each query (..., M, D) to each prototype (N, D)."""
    return -squared_distances(query, prototypes)
