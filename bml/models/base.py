"""What every model of the toolkit shares: view names and the DropBlock ramp counter."""

from __future__ import annotations

import torch
from torch import nn

from bml.models.dropblock import DropBlock


def check_episode_batch(images: torch.Tensor, way: int, shot: int, query: int) -> None:
    """Fail early (shapes only, no device sync) when a batch is not one way x (shot + query) episode."""
    if images.shape[0] != way * (shot + query):
        raise ValueError(f"an episode of {way}-way {shot}-shot {query}-query needs {way * (shot + query)} "
                         f"images in shot-major order, got {images.shape[0]}")


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Average over positions: B x D x h x w -> B x D."""
    return feature_map.mean(dim=(2, 3))


class FewShotModel(nn.Module):
    """Base of BML and the baselines.

    ``forward`` returns one feature map per view, ``embed`` one (B, D) embedding per view, both
    in the order of ``view_names``; ``losses`` returns a dict of scalar tensors with 'total'.
    ``losses`` accepts and ignores keyword arguments it does not use, so that a trainer can call
    every model with the same arguments.
    """

    view_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._dropblock_step = 0

    def dropblocks(self) -> list[DropBlock]:
        return [m for m in self.modules() if isinstance(m, DropBlock)]

    @property
    def dropblock_step(self) -> int:
        """DropBlock ramp counter t (training steps): advanced by each training-mode forward.

        A trainer sets it to the global step before each episode's forward, so that all the
        episodes of one optimiser step see the same t, and saves it in its checkpoints (it is
        not in the state dict). Models without DropBlock (ResNet-18) just keep the value."""
        blocks = self.dropblocks()
        return blocks[0].step if blocks else self._dropblock_step

    @dropblock_step.setter
    def dropblock_step(self, step: int) -> None:
        self._dropblock_step = int(step)
        for block in self.dropblocks():
            block.step = int(step)
