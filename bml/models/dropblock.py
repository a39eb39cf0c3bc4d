"""DropBlock (Ghiasi et al., 2018) with the linear keep-probability ramp of the BML recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RAMP_STEPS = 40000
"""Steps over which the drop probability grows linearly from 0 to ``drop_rate``, as in the released training code."""


def keep_probability(drop_rate: float, step: int, ramp_steps: int = RAMP_STEPS) -> float:
    """``max(1 - drop_rate * step / ramp_steps, 1 - drop_rate)``: the ramped keep probability."""
    return max(1.0 - drop_rate * step / ramp_steps, 1.0 - drop_rate)


def expand_seeds(seeds: torch.Tensor, block_size: int) -> torch.Tensor:
    """Drop map (1 = dropped) in which each seed of a (B, C, H-bs+1, W-bs+1) map covers the
    ``block_size``² square extending down and right of it, as a (B, C, H, W) tensor.

    A stride-1 max-pool over the seed map padded by bs-1 on every side: no index loops or scatters.
    """
    return F.max_pool2d(F.pad(seeds, (block_size - 1,) * 4), kernel_size=block_size, stride=1)


def dropblock_mask(shape: torch.Size, gamma: float, block_size: int, device: torch.device) -> torch.Tensor:
    """Float32 keep-mask (1 = keep) of ``shape`` = (B, C, H, W): Bernoulli(gamma) seeds on the
    positions where a whole block fits, each dropping its block."""
    batch, channels, height, width = shape
    seed_shape = (batch, channels, height - block_size + 1, width - block_size + 1)
    seeds = torch.bernoulli(torch.full(seed_shape, gamma, device=device))
    return 1.0 - expand_seeds(seeds, block_size)


class DropBlock(nn.Module):
    """DropBlock whose drop probability ramps up with the number of training steps ``step``.

    ``step`` is a plain Python attribute, not a buffer, so it adds no state-dict keys (released
    checkpoints load strictly) and reading it never syncs with an accelerator. It is advanced by
    one on every training-mode forward and can be set directly; models expose it as
    ``model.dropblock_step`` and the trainer saves it with its checkpoints. The original code
    also advanced its counter on evaluation passes, which ended its ramp near epoch 68 instead
    of 80; here evaluation passes neither drop nor count, and the trainer sets ``step`` before
    each training pass to the count it chose (``--dropblock_counter``: the original's forward
    passes, or the training steps).

    The block size is clamped to the feature map, so small inputs (28-32 px) work.
    """

    def __init__(self, drop_rate: float, block_size: int = 5, ramp_steps: int = RAMP_STEPS) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.block_size = block_size
        self.ramp_steps = ramp_steps
        self.step = 0

    def gamma(self, height: int, width: int, block_size: int) -> float:
        """Seed probability that drops about ``1 - keep`` of the units of a height x width map.

        For a square map of side fs this is ``(1 - keep) / bs² * fs² / (fs - bs + 1)²`` (Ghiasi et al.).
        """
        keep = keep_probability(self.drop_rate, self.step, self.ramp_steps)
        valid = (height - block_size + 1) * (width - block_size + 1)
        return min(1.0, (1.0 - keep) / block_size**2 * height * width / valid)

    # Left out of torch.compile graphs: the Python counter changes every step and would force a
    # recompilation each time. torch.compiler.disable as a decorator imports torch._dynamo (about a
    # second) when this module is imported; torch's own lazy form imports it on the first call.
    @torch._disable_dynamo
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        height, width = x.shape[-2:]
        block_size = min(self.block_size, height, width)
        gamma = self.gamma(height, width, block_size)
        self.step += 1
        if gamma <= 0.0:
            return x
        # The mask and its normaliser stay in float32 so that a bf16 sum over millions of units
        # does not round the rescaling factor.
        mask = dropblock_mask(x.shape, gamma, block_size, x.device)
        scale = mask.numel() / mask.sum().clamp_min(1.0)
        return x * (mask * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}, ramp_steps={self.ramp_steps}"
