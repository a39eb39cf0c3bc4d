"""The published transforms A-E (docs/ARCHITECTURE.md, "Transforms") and 'O', the identity-keeping one for characters.

Every transform takes a PIL RGB image and returns a normalised 3 x S x S float tensor, S = image_size.
Sizes other than 84 scale the padding and the test-time Resize(92) proportionally. Images stored
smaller (or larger) than S are resized to S before cropping where the recipe keeps the stored size
(B, C, D, O): the published CIFAR-FS/FC100 recipe trains 32 px images at 84 px.
"""
from __future__ import annotations

from typing import Callable

from .base import DatasetError

_MINI = ((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255),
         (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255))
_TIERED = ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255))
_CIFAR = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
_OMNIGLOT = ((0.917, 0.917, 0.917), (0.221, 0.221, 0.221))   # ink on white paper, measured at 28 px

# transform id -> (mean, std)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "A": _MINI, "B": _TIERED, "C": _TIERED, "D": _CIFAR, "E": _MINI, "O": _OMNIGLOT,
}
TRANSFORM_IDS = tuple(NORMALIZATION)


def check_transform_id(transform_id: str) -> str:
    if transform_id not in NORMALIZATION:
        raise DatasetError(f"unknown transform '{transform_id}': expected one of {', '.join(TRANSFORM_IDS)}")
    return transform_id


def build_transform(transform_id: str, image_size: int = 84, train: bool = False) -> Callable:
    """The training (`train=True`) or test transform `transform_id` at `image_size` pixels."""
    import torchvision.transforms as T  # here, not at import time: torchvision imports torch._dynamo (~1 s)

    check_transform_id(transform_id)
    size = int(image_size)
    mean, std = NORMALIZATION[transform_id]
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    jitter_flip = [T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), T.RandomHorizontalFlip()]
    if transform_id in ("A", "E"):
        if train:
            steps = [T.RandomResizedCrop(size), *jitter_flip]
        else:
            steps = [T.Resize(round(92 * size / 84)), T.CenterCrop(size)]
    elif transform_id == "O":
        # Small shifts only: colour, flips and rotations change a character's identity.
        steps = [T.Resize((size, size))]
        if train:
            steps.append(T.RandomCrop(size, padding=max(1, round(2 * size / 28)), padding_mode="edge"))
    else:
        steps = [T.Resize((size, size))]
        if train:
            steps += [T.RandomCrop(size, padding=round(8 * size / 84)), *jitter_flip]
    return T.Compose(steps + finish)
