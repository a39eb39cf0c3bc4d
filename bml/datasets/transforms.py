"""The published transforms A-E (docs/ARCHITECTURE.md, "Transforms"), 'O', the identity-keeping one for characters,
and 'K', 'O' with the small affine distortions Koch et al. (2015) trained their Omniglot network with.

Every transform takes a PIL RGB image and returns a normalised 3 x S x S float tensor, S = image_size.
Sizes other than 84 scale the padding and the test-time Resize(92) proportionally. Images stored
smaller (or larger) than S are resized to S before cropping where the recipe keeps the stored size
(B, C, D, O): the published CIFAR-FS/FC100 recipe trains 32 px images at 84 px.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from .errors import DatasetError

_MINI = ((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255),
         (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255))
_TIERED = ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255))
_CIFAR = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
_OMNIGLOT = ((0.917, 0.917, 0.917), (0.221, 0.221, 0.221))   # ink on white paper, measured at 28 px

# transform id -> (mean, std)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "A": _MINI, "B": _TIERED, "C": _TIERED, "D": _CIFAR, "E": _MINI, "O": _OMNIGLOT, "K": _OMNIGLOT,
}
TRANSFORM_IDS = tuple(NORMALIZATION)
CHARACTER_TRANSFORMS = ("O", "K")
"""Transforms for characters: shifts (and for K affine distortions), no colour jitter or flips."""
HOST_ONLY_TRANSFORMS = ("K",)
"""Transforms whose training augmentation runs on the host only (`--augment host`)."""
AFFINE_DEGREES, AFFINE_SCALE, AFFINE_SHEAR = 10.0, (0.8, 1.2), 16.7
"""K's distortions (Koch et al. 2015): rotation within +-10 degrees, scale within 0.8-1.2, shear within +-16.7
degrees on each axis (their shear factor 0.3 = tan 16.7 degrees), on white paper, before O's shifts."""


def check_transform_id(transform_id: str) -> str:
    if transform_id not in NORMALIZATION:
        raise DatasetError(f"unknown transform '{transform_id}': expected one of {', '.join(TRANSFORM_IDS)}")
    return transform_id


@dataclass(frozen=True)
class TransformSettings:
    """What a data set's images go through, as data: the transform id, the input size in pixels, and the
    statistics the inputs are normalised with (the transform's own, or another data set's cross-domain)."""

    transform: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, transform_id: str, image_size: int) -> TransformSettings:
        """Transform `transform_id` at `image_size` pixels, normalised with its own statistics."""
        mean, std = NORMALIZATION[check_transform_id(transform_id)]
        return cls(transform_id, image_size, mean, std)

    def build(self, train: bool = False) -> Callable:
        """The training (`train=True`) or test transform these settings describe."""
        return build_transform(self.transform, self.image_size, train, (self.mean, self.std))


JITTER = 0.4
"""ColorJitter strength of A-E: brightness, contrast and saturation factors uniform in [1 - 0.4, 1 + 0.4]."""


CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
"""RandomResizedCrop of A and E: area fraction and aspect-ratio ranges (torchvision's defaults)."""


def shift_padding(transform_id: str, image_size: int) -> tuple[int, str]:
    """(pixels, padding mode) of the padded RandomCrop of B, C, D and O, scaled with the input size."""
    if check_transform_id(transform_id) in CHARACTER_TRANSFORMS:
        return max(1, round(2 * int(image_size) / 28)), "edge"
    return round(8 * int(image_size) / 84), "constant"


def has_jitter_and_flip(transform_id: str) -> bool:
    """A-E jitter colours and flip; 'O' and 'K' do neither (both change a character's identity)."""
    return check_transform_id(transform_id) not in CHARACTER_TRANSFORMS


def crop_transform(transform_id: str, image_size: int = 84, train: bool = False) -> Callable:
    """The geometric part of transform `transform_id`, PIL image -> PIL image of S x S pixels: the
    (random) crop in training, the resize and centre crop in testing."""
    import torchvision.transforms as T  # here, not at import time: torchvision imports torch._dynamo (~1 s)

    check_transform_id(transform_id)
    size = int(image_size)
    if transform_id in ("A", "E"):
        if train:
            return T.Compose([T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO)])
        return T.Compose([T.Resize(round(92 * size / 84)), T.CenterCrop(size)])
    steps = [T.Resize((size, size))]
    if train and transform_id == "K":
        steps.append(T.RandomAffine(AFFINE_DEGREES, scale=AFFINE_SCALE, shear=(-AFFINE_SHEAR, AFFINE_SHEAR) * 2,
                                    interpolation=T.InterpolationMode.BILINEAR, fill=(255, 255, 255)))
    if train:   # 'O': small shifts only, colour, flips and rotations change a character's identity
        padding, mode = shift_padding(transform_id, size)
        steps.append(T.RandomCrop(size, padding=padding, padding_mode=mode))
    return T.Compose(steps)


def build_transform(transform_id: str, image_size: int = 84, train: bool = False,
                    normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> Callable:
    """The training (`train=True`) or test transform `transform_id` at `image_size` pixels, normalised with
    `normalization` (mean, std) when given, else with the transform's own statistics."""
    import torchvision.transforms as T

    mean, std = normalization or NORMALIZATION[check_transform_id(transform_id)]
    steps = list(crop_transform(transform_id, image_size, train).transforms)
    if train and has_jitter_and_flip(transform_id):
        steps += [T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER), T.RandomHorizontalFlip()]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
