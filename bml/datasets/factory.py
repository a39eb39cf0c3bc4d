"""One entry point from (data set name, split) to a Dataset; the per-data-set input settings and their resolver."""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .base import DATA_HELP, ArrayDataset, DatasetError, FewShotDataset, FileDataset, SplitData, common_image_shape
from .glyphs import read_glyphs
from .omniglot import OMNIGLOT_SPLITS, read_omniglot
from .readers import (CIFAR_FILES, EXPECTED_FILES, MINI_IMAGENET_FILES, read_cub, read_image_folder, read_pickle_split,
                      read_tiered)
from .transforms import NORMALIZATION, build_transform, check_transform_id

SPLITS = ("train", "val", "test")
EMBEDDED_DATASET = "glyphs"

# Layouts under <root>/<name>/; any other name is an image folder there.
_LAYOUT_READERS: dict[str, Callable[[Path, str], SplitData]] = {
    "miniImageNet": partial(read_pickle_split, files=MINI_IMAGENET_FILES),
    "tieredImageNet": read_tiered,
    "CIFAR-FS": partial(read_pickle_split, files=CIFAR_FILES),
    "FC100": partial(read_pickle_split, files=CIFAR_FILES),
    "CUB": read_cub,
}
DATASET_NAMES = (*_LAYOUT_READERS, "glyphs", "omniglot")


@dataclass(frozen=True)
class DatasetDefaults:
    """What a data set is trained and evaluated with unless told otherwise."""

    transform: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_DEFAULTS = {
    "miniImageNet": ("A", 84), "tieredImageNet": ("B", 84), "FC100": ("C", 84), "CIFAR-FS": ("D", 84),
    "CUB": ("E", 84), "glyphs": ("O", 32), "omniglot": ("O", 28), "omniglot-small": ("O", 28),
}
"""Data set -> (transform id, input size): the one table of each data set's input settings."""
NATURAL_IMAGES_DATASET = "miniImageNet"
"""Whose input settings image-folder data sets get, and checkpoints that record neither data set nor transform."""


def canonical_name(name: str) -> str:
    """Known data sets match case-insensitively ('cifar-fs' -> 'CIFAR-FS'); other names are image folders."""
    return {known.lower(): known for known in (*DATASET_NAMES, *_DEFAULTS)}.get(name.lower(), name)


def dataset_defaults(name: str) -> DatasetDefaults:
    """Default transform id, input size and normalisation of a data set (image folders: as miniImageNet)."""
    transform, image_size = _DEFAULTS.get(canonical_name(name), _DEFAULTS[NATURAL_IMAGES_DATASET])
    mean, std = NORMALIZATION[transform]
    return DatasetDefaults(transform, image_size, mean, std)


class InputSettings(NamedTuple):
    """What a model's input images go through: a transform id and the input size in pixels."""

    transform: str
    image_size: int


def input_transform_settings(recorded: Mapping[str, Any], image_size: int | None = None,
                             transform_id: str | None = None) -> InputSettings:
    """The one rule for a model's input settings: the explicit argument, else the recorded value, else
    the data set's default (`dataset_defaults`).

    `recorded` is what a checkpoint's config holds (its `dataset`, `transform`, `image_size`; see
    `bml.checkpoint.model_config`), or just `{"dataset": name}` for a model not trained yet. An explicit
    value that differs from the recorded one wins with a warning: a model fed other inputs than it was
    trained on can lose half its accuracy. Without a recorded data set or transform, the transform of
    natural images (miniImageNet's) is used, with a warning.
    """
    dataset = recorded.get("dataset")
    for name, explicit in (("transform", transform_id), ("image_size", image_size)):
        if explicit is not None and recorded.get(name) is not None and explicit != recorded[name]:
            warnings.warn(f"--{name} {explicit} differs from the checkpoint's {recorded[name]}: the model was trained "
                          f"on {recorded[name]} inputs and may score much lower; leave --{name} out to use the "
                          f"checkpoint's", stacklevel=2)
    if dataset is None and transform_id is None and recorded.get("transform") is None:
        warnings.warn(f"the checkpoint records neither its data set nor its transform: using the "
                      f"{NATURAL_IMAGES_DATASET} test transform (ImageNet-style normalisation); pass the "
                      f"transform id ('A'..'E', 'O') if the model was trained on something else", stacklevel=2)
    defaults = dataset_defaults(dataset or NATURAL_IMAGES_DATASET)
    return InputSettings(check_transform_id(transform_id or recorded.get("transform") or defaults.transform),
                         int(image_size or recorded.get("image_size") or defaults.image_size))


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The explicit argument, else $BML_DATA_ROOT, else `data/`."""
    return Path(data_root or os.environ.get("BML_DATA_ROOT") or "data")


def _check_split(name: str, split: str) -> None:
    splits = OMNIGLOT_SPLITS if name == "omniglot" else SPLITS
    if split not in splits:
        raise DatasetError(f"unknown split '{split}' for {name}: expected one of {', '.join(splits)}")


def read_split(name: str, split: str, data_root: str | Path | None = None, image_size: int | None = None,
               load_images: bool = True, allow_uncropped_cub: bool = False) -> SplitData:
    """Labels, class names and images (or paths) of one split, without a transform.

    load_images=False lets tieredImageNet read only its npz headers (for `summarize`).
    allow_uncropped_cub: CUB val/test may use the uncropped images when the crops are missing (warns).
    """
    name = canonical_name(name)
    _check_split(name, split)
    image_size = input_transform_settings({"dataset": name}, image_size).image_size
    root = resolve_data_root(data_root)
    if name == EMBEDDED_DATASET:
        return read_glyphs(split)
    if not root.is_dir():
        raise DatasetError(
            f"data root {root} does not exist: pass --data_root, or set BML_DATA_ROOT, to the folder holding "
            f"{name}/ ({DATA_HELP}); the embedded data set '{EMBEDDED_DATASET}' needs no download"
        )
    if name == "omniglot":
        return read_omniglot(root, split, image_size)
    folder = root / name
    if name in _LAYOUT_READERS and not folder.is_dir():
        raise DatasetError(f"expected the folder {folder} for {name}, holding {', '.join(EXPECTED_FILES[name])}: "
                           f"{DATA_HELP}")
    if not folder.is_dir():
        raise DatasetError(
            f"unknown dataset '{name}': not one of {', '.join(DATASET_NAMES)}, and no image folder "
            f"{folder}/<split>/<class>/<image> exists; {DATA_HELP}"
        )
    if name == "tieredImageNet":
        return read_tiered(folder, split, load_images=load_images)
    if name == "CUB":
        return read_cub(folder, split, allow_uncropped=allow_uncropped_cub)
    return _LAYOUT_READERS.get(name, read_image_folder)(folder, split)


def build_dataset(name: str, split: str, data_root: str | Path | None = None, image_size: int | None = None,
                  train: bool = False, transform: str | None = None,
                  allow_uncropped_cub: bool = False) -> FewShotDataset:
    """A split of a data set with its training (`train=True`) or test transform.

    image_size None means the data set's default (84; omniglot 28; glyphs 32). `transform` is a
    transform id ('A'..'E', 'O') overriding the data set's default. CUB val/test need the bounding-box
    crops unless `allow_uncropped_cub`.
    """
    transform_id, image_size = input_transform_settings({"dataset": name}, image_size, transform)
    data = read_split(name, split, data_root, image_size, allow_uncropped_cub=allow_uncropped_cub)
    common = dict(class_names=data.class_names, transform=build_transform(transform_id, image_size, train),
                  name=canonical_name(name), split=split, transform_id=transform_id, image_size=image_size, train=train)
    if data.images is not None:
        return ArrayDataset(data.images, data.labels, **common)
    return FileDataset(data.paths, data.labels, **common)


def summarize(name: str, data_root: str | Path | None = None) -> dict[str, dict]:
    """Per split: classes, images and image shape (None for file layouts with mixed sizes)."""
    summary = {}
    for split in SPLITS:
        data = read_split(name, split, data_root, load_images=False, allow_uncropped_cub=True)
        shape = data.image_shape if data.paths is None else common_image_shape(data.paths)
        summary[split] = {"classes": len(data.class_names), "images": len(data.labels),
                          "image_shape": list(shape) if shape is not None else None}
    return summary
