"""Dataset containers shared by every reader, and what a reader is asked for (`ReadOptions`).

A split is held as ONE numpy array (uint8 images, or file paths as a fixed-width string array) plus
an int64 label array: DataLoader workers then share the pages of the parent process instead of
copying millions of Python objects (whose reference counts would touch every page).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .decoded import open_decoded_images
from .errors import DATA_HELP, DatasetError
from .image_files import check_image_files, common_image_shape, image_to_rgb
from .transforms import TransformSettings


@dataclass(frozen=True)
class ReadOptions:
    """What a caller may ask of any reader; each reader uses those that concern it and ignores the others."""

    image_size: int | None = None
    """Input size, for readers that resize at load time (Omniglot)."""
    load_images: bool = True
    """False: labels and image shape only (tieredImageNet then reads just its npz headers, for `summarize`)."""
    allow_uncropped: bool = False
    """CUB val/test: the uncropped images when the bounding-box crops are missing (warns)."""
    tiered_labels: str = "offset"
    """tieredImageNet train (train + val): 'offset' numbers val's classes after train's (448 classes); 'raw'
    concatenates the stored labels as the original code did, so that val's class k shares output k with train's
    class k (`bml.datasets.readers.TIERED_LABELS`)."""
    rotation_classes: bool = False
    """omniglot-lake train: each character's rotations by 90, 180 and 270 degrees are three more classes."""


@dataclass
class SplitData:
    """What a reader returns: labels 0..C-1 and either the image array or the image paths.

    `images` may be None when the reader was asked for metadata only (`load_images=False`);
    `image_shape` then still says what the images are, and `image_members` where they are.
    """

    labels: np.ndarray
    class_names: list[str]
    images: np.ndarray | None = None
    paths: np.ndarray | None = None
    image_shape: tuple[int, int, int] | None = None
    image_members: tuple[tuple[Path, str], ...] = ()
    """The .npz members (path, key) holding the images in order, when `images` was not loaded."""
    stored_class_ids: dict[str, np.ndarray] = field(default_factory=dict)
    """Label file name -> the class ids as that file stores them (sorted), for readers of such files: what
    `python -m bml.datasets summary` reports as the stored label ranges."""
    class_groups: list[str] | None = None
    """The group of each class where the data set declares groups (Omniglot: its alphabet), for episodes within
    one group (`bml.datasets.sampler.EpisodeRule`)."""
    drawers: np.ndarray | None = None
    """Who drew each image, as an int per image (-1: unknown), where the data set records it (Omniglot)."""


def remap_labels(original: Sequence | np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary class ids to 0..C-1 in sorted order of the ids; returns (labels, sorted ids)."""
    original = np.asarray(original)
    if original.ndim != 1 or original.size == 0:
        raise DatasetError(f"{source}: expected a non-empty 1-D list of labels, got shape {original.shape}")
    class_ids, labels = np.unique(original, return_inverse=True)
    return labels.astype(np.int64).reshape(-1), class_ids


def check_images(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Images must be an N x H x W x 3 uint8 array with one label per image."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetError(
            f"{source}: expected images as an N x H x W x 3 uint8 array, got {images.dtype} of shape "
            f"{images.shape}; {DATA_HELP}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{source}: {len(images)} images but {len(labels)} labels; the file is incomplete or "
            f"not in the expected layout ({DATA_HELP})"
        )


class FewShotDataset(torch.utils.data.Dataset):
    """A split of a few-shot data set: `ds[i]` is (normalised 3 x S x S tensor, int label).

    `input_settings` (`TransformSettings`, None when unknown) says as data what its images go through: transform
    id, input size and normalisation; `train` whether that is the training (True) or the test (False) transform.
    `transform` is what `ds[i]` applies: the one `use_input_settings` built from them, or any callable given.
    `class_groups` (one name per class) and `drawers` (one int per image) are None unless the data set declares
    them (`SplitData`); episodes within a group and by distinct drawers read them (`episode_sampler`).
    """

    def __init__(self, labels: np.ndarray, class_names: list[str], transform: Callable | None = None,
                 name: str = "", split: str = "", transform_id: str | None = None, image_size: int | None = None,
                 train: bool | None = None, class_groups: Sequence[str] | None = None,
                 drawers: np.ndarray | None = None):
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.class_groups = None if class_groups is None else list(class_groups)
        self.drawers = None if drawers is None else np.asarray(drawers, dtype=np.int64)
        if self.class_groups is not None and len(self.class_groups) != len(self.class_names):
            raise DatasetError(f"{name} {split}: {len(self.class_groups)} class groups for {len(self.class_names)} "
                               "classes")
        if self.drawers is not None and len(self.drawers) != len(self.labels):
            raise DatasetError(f"{name} {split}: {len(self.drawers)} drawers for {len(self.labels)} images")
        self.transform = transform
        self.name, self.split, self.train = name, split, train
        self.input_settings = None if transform_id is None else TransformSettings.of(transform_id, image_size)
        self._settings_transform: Callable | None = None   # the transform use_input_settings built

    def use_input_settings(self, settings: TransformSettings) -> None:
        """Take `settings` and the transform built from them (the training or the test one, as `train` says)."""
        self.input_settings = settings
        self.transform = self._settings_transform = settings.build(train=bool(self.train))

    @property
    def uses_test_transform(self) -> bool:
        """Whether `ds[i]` is the test transform of `input_settings` and nothing else (`EvalCrops` then gives the
        same model inputs as uint8 crops)."""
        return self.train is False and self.input_settings is not None and self.transform is self._settings_transform

    @property
    def transform_id(self) -> str | None:
        return None if self.input_settings is None else self.input_settings.transform

    @property
    def image_size(self) -> int | None:
        return None if self.input_settings is None else self.input_settings.image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def load_array(self, index: int) -> np.ndarray:
        """Image `index` as an H x W x 3 uint8 array (what `--augment device` sends)."""
        return np.asarray(self.load_image(index), dtype=np.uint8)

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
                f"classes={self.num_classes}, images={len(self)}, image_shape={self.image_shape})")


class ArrayDataset(FewShotDataset):
    """Images held in memory as one N x H x W x 3 uint8 array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str], **kwargs):
        super().__init__(labels, class_names, **kwargs)
        check_images(images, self.labels, f"{self.name} {self.split}")
        self.images = images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def load_array(self, index: int) -> np.ndarray:
        return self.images[index]


class FileDataset(FewShotDataset):
    """Images read from files on access, any mode converted to RGB (`image_to_rgb`).

    Every file is checked when the data set is opened (`check_image_files`), so that a bad image stops
    the run at once, naming it, not in the middle of an epoch. `image_shape` reads every file header
    the first time it is asked for (fast, no decoding) and is None when the sizes differ.
    `decode_once()` decodes every file into one memory-mapped store that `load_array` then reads.
    """

    def __init__(self, paths: np.ndarray, labels: np.ndarray, class_names: list[str], **kwargs):
        super().__init__(labels, class_names, **kwargs)
        self.paths = np.asarray(paths, dtype=np.str_)
        check_image_files(self.paths, f"{self.name} {self.split}")
        self.decoded = None

    @cached_property
    def image_shape(self) -> tuple[int, int, int] | None:
        return common_image_shape(self.paths)

    def load_image(self, index: int) -> Image.Image:
        with Image.open(Path(self.paths[index])) as image:
            return image_to_rgb(image)

    def decode_once(self) -> None:
        """Read `load_array` from a store of the decoded files (`bml.datasets.decoded`), built on first use."""
        if self.decoded is None:
            self.decoded = open_decoded_images(self.paths, super().load_array, f"{self.name} {self.split}")

    def load_array(self, index: int) -> np.ndarray:
        return self.decoded[index] if self.decoded is not None else super().load_array(index)


def with_normalization(dataset: FewShotDataset, mean: Sequence[float], std: Sequence[float]) -> FewShotDataset:
    """`dataset` normalising its inputs with `mean` and `std` instead of its own statistics, its resize and crop
    kept: a cross-domain evaluation feeds the model the statistics its BatchNorm layers were fitted to. Changes
    `dataset` (its `input_settings` and transform) in place and returns it."""
    if dataset.input_settings is None:
        raise DatasetError(f"{dataset.name} {dataset.split} does not record its input settings, so it cannot be "
                           "normalised otherwise: build it with bml.datasets.build_dataset")
    dataset.use_input_settings(replace(dataset.input_settings, mean=tuple(mean), std=tuple(std)))
    return dataset
