"""The data sets table `DATASETS`, the one entry point from (data set name, split) to a Dataset, and the
resolver of a model's input settings.

A new data set layout is one `DatasetLayout` entry: its reader, default input settings, splits and expected
files. `read_split`, `build_dataset`, `summarize`, `canonical_name`, `dataset_defaults`, and the help texts and
messages that name data sets all read the table; a name that is not in it is an image folder (`IMAGE_FOLDER`).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .base import ArrayDataset, FewShotDataset, FileDataset, ReadOptions, SplitData
from .errors import DATA_HELP, DatasetError
from .fingerprint import split_fingerprint
from .glyphs import read_glyphs
from .image_files import common_image_shape
from .omniglot import (LAKE_SPLITS, OMNIGLOT_FILES, OMNIGLOT_IMAGE_SIZE, OMNIGLOT_SPLITS, read_omniglot,
                       read_omniglot_lake)
from .readers import (CIFAR_FILES, CUB_FILES, IMAGE_FOLDER_FILES, MINI_IMAGENET_FILES, TIERED_FILES, TIERED_LABELS,
                      read_cub, read_image_folder, read_pickle_split, read_tiered)
from .transforms import TransformSettings, check_transform_id

SPLITS = ("train", "val", "test")
Reader = Callable[[Path | None, str, ReadOptions], SplitData]
"""(the data set's folder `<data root>/<name>`, None for one that needs no data root; split; options) -> SplitData."""


@dataclass(frozen=True)
class DatasetLayout:
    """One data set the toolkit reads: how its files are read, what its folder holds, and what its images go
    through unless told otherwise."""

    description: str
    """One line: what the data set is."""
    reader: Reader
    transform: str
    """Default transform id ('A'..'E', 'O', 'K'; `bml.datasets.transforms`)."""
    image_size: int
    """Default input size in pixels."""
    expected_files: tuple[str, ...]
    """What its folder holds, as messages and help name it."""
    splits: tuple[str, ...] = SPLITS
    needs_data_root: bool = True
    """False: built by the toolkit itself, nothing to download (the reader gets no folder)."""
    listed: bool = True
    """Named in DATASET_NAMES and the help texts; False for an image folder known only for its input settings."""
    folder: str | None = None
    """The folder under the data root, when not the data set's name (omniglot-lake reads omniglot/)."""
    rotation_classes: bool = False
    """Whether its reader can make each training class's rotations more classes (`ReadOptions.rotation_classes`)."""


DATASETS: dict[str, DatasetLayout] = {
    "miniImageNet": DatasetLayout(
        "100 ImageNet classes (64 train, 16 val, 20 test), 84 px, in pickled arrays",
        partial(read_pickle_split, files=MINI_IMAGENET_FILES), "A", 84, tuple(MINI_IMAGENET_FILES.values())),
    "tieredImageNet": DatasetLayout(
        "608 ImageNet classes in 34 super-categories (351/97/160), 84 px, in npz arrays; train is train + val",
        read_tiered, "B", 84, TIERED_FILES),
    "CIFAR-FS": DatasetLayout(
        "the 100 CIFAR-100 classes split at random (64/16/20), 32 px, in pickled arrays",
        partial(read_pickle_split, files=CIFAR_FILES), "D", 84, tuple(CIFAR_FILES.values())),
    "FC100": DatasetLayout(
        "the 100 CIFAR-100 classes split by super-class (60/20/20), 32 px, in pickled arrays",
        partial(read_pickle_split, files=CIFAR_FILES), "C", 84, tuple(CIFAR_FILES.values())),
    "CUB": DatasetLayout(
        "200 bird species (100/50/50), JPEG files of mixed sizes; val/test on the bounding-box crops",
        read_cub, "E", 84, CUB_FILES),
    "glyphs": DatasetLayout(
        "100 characters rendered from the fonts matplotlib ships (64/16/20), 32 px, built on first use",
        read_glyphs, "O", 32, (), needs_data_root=False),
    "omniglot": DatasetLayout(
        "Omniglot's characters in four rotations, Vinyals split (4112/688/1692 classes), resized at load time",
        read_omniglot, "O", OMNIGLOT_IMAGE_SIZE, OMNIGLOT_FILES, splits=OMNIGLOT_SPLITS),
    "omniglot-lake": DatasetLayout(
        "Omniglot as Lake et al. meant it: train on 26 background alphabets (829 characters), val on 4 others "
        "(135), test on the 20 evaluation alphabets (659); alphabets as groups, drawers recorded",
        read_omniglot_lake, "O", OMNIGLOT_IMAGE_SIZE, OMNIGLOT_FILES, splits=LAKE_SPLITS, folder="omniglot",
        rotation_classes=True),
    "omniglot-small": DatasetLayout(
        "an image folder of Omniglot characters (experiments/omniglot_cpu.sh quick)",
        read_image_folder, "O", OMNIGLOT_IMAGE_SIZE, IMAGE_FOLDER_FILES, listed=False),
}
NATURAL_IMAGES_DATASET = "miniImageNet"
"""Whose input settings image-folder data sets get, and checkpoints that record neither data set nor transform."""
IMAGE_FOLDER = DatasetLayout(
    "your own images, one folder per class", read_image_folder, DATASETS[NATURAL_IMAGES_DATASET].transform,
    DATASETS[NATURAL_IMAGES_DATASET].image_size, IMAGE_FOLDER_FILES, listed=False)
"""The layout of every name that is not in `DATASETS`: `<data root>/<name>/<split>/<class>/<image>`."""
EMBEDDED_DATASET = next(name for name, layout in DATASETS.items() if not layout.needs_data_root)
DatasetDefaults = TransformSettings
"""What a data set is trained and evaluated with unless told otherwise (`dataset_defaults`)."""


def dataset_names() -> tuple[str, ...]:
    """The data sets the table names, in its order (image folders known only for their settings left out)."""
    return tuple(name for name, layout in DATASETS.items() if layout.listed)


DATASET_NAMES = dataset_names()
"""The data sets of `DATASETS` at import (`dataset_names()` reads the table itself)."""


def canonical_name(name: str) -> str:
    """Known data sets match case-insensitively ('cifar-fs' -> 'CIFAR-FS'); other names are image folders."""
    return {known.lower(): known for known in DATASETS}.get(name.lower(), name)


def dataset_layout(name: str) -> DatasetLayout:
    """The table's entry of `name` (in any case), else the image-folder layout."""
    return DATASETS.get(canonical_name(name), IMAGE_FOLDER)


def dataset_defaults(name: str) -> DatasetDefaults:
    """Default transform id, input size and normalisation of a data set (image folders: as miniImageNet)."""
    layout = dataset_layout(name)
    return TransformSettings.of(layout.transform, layout.image_size)


def dataset_flag_help() -> str:
    """The data sets a `--dataset` flag takes, as its help lists them."""
    names = [name if layout.needs_data_root else f"{name} (embedded, no download)"
             for name, layout in DATASETS.items() if layout.listed]
    return ", ".join(names) + f", or the name of an image folder <data_root>/<name>/{IMAGE_FOLDER.expected_files[0]}"


def describe_datasets() -> str:
    """Every data set of the table with its description and what its folder holds, two lines each."""
    entries = [(name, layout.folder or name, layout) for name, layout in DATASETS.items() if layout.listed]
    lines = []
    for label, folder, layout in [*entries, ("any other name", "<name>", IMAGE_FOLDER)]:
        where = (f"<data_root>/{folder}/ holds {', '.join(layout.expected_files)}" if layout.needs_data_root
                 else "needs no data root: nothing to download")
        lines += [f"  {label}: {layout.description}", f"      {where}"]
    return "\n".join(lines)


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
                      f"transform id ('A'..'E', 'O', 'K') if the model was trained on something else", stacklevel=2)
    defaults = dataset_defaults(dataset or NATURAL_IMAGES_DATASET)
    return InputSettings(check_transform_id(transform_id or recorded.get("transform") or defaults.transform),
                         int(image_size or recorded.get("image_size") or defaults.image_size))


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The explicit argument, else $BML_DATA_ROOT, else `data/`."""
    return Path(data_root or os.environ.get("BML_DATA_ROOT") or "data")


def _missing_folder(name: str, folder: Path, layout: DatasetLayout) -> DatasetError:
    holds = ", ".join(layout.expected_files)
    if layout.listed:
        return DatasetError(f"expected the folder {folder} for {name}, holding {holds}: {DATA_HELP}")
    return DatasetError(f"unknown dataset '{name}': not one of {', '.join(dataset_names())}, and no image folder "
                        f"{folder}/{holds} exists; {DATA_HELP}")


def read_split(name: str, split: str, data_root: str | Path | None = None, image_size: int | None = None,
               load_images: bool = True, allow_uncropped_cub: bool = False,
               tiered_labels: str = TIERED_LABELS[0], rotation_classes: bool = False) -> SplitData:
    """Labels, class names and images (or paths) of one split, without a transform, read by the data set's
    entry of `DATASETS` (any other name: an image folder).

    load_images=False lets tieredImageNet read only its npz headers (for `summarize`).
    allow_uncropped_cub: CUB val/test may use the uncropped images when the crops are missing (warns).
    tiered_labels: how tieredImageNet's train + val are labelled (`ReadOptions.tiered_labels`).
    rotation_classes: omniglot-lake train with each character's rotations as more classes.
    """
    name = canonical_name(name)
    layout = dataset_layout(name)
    if split not in layout.splits:
        raise DatasetError(f"unknown split '{split}' for {name}: expected one of {', '.join(layout.splits)}")
    if rotation_classes and not layout.rotation_classes:
        able = ", ".join(known for known, entry in DATASETS.items() if entry.rotation_classes)
        raise DatasetError(f"{name} cannot make rotations of its classes more classes (--rotation_classes): only "
                           f"{able} can; leave the flag out")
    options = ReadOptions(int(image_size or layout.image_size), load_images, allow_uncropped_cub, tiered_labels,
                          rotation_classes)
    if not layout.needs_data_root:
        return layout.reader(None, split, options)
    root = resolve_data_root(data_root)
    if not root.is_dir():
        raise DatasetError(
            f"data root {root} does not exist: pass --data_root, or set BML_DATA_ROOT, to the folder holding "
            f"{name}/ ({DATA_HELP}); the embedded data set '{EMBEDDED_DATASET}' needs no download"
        )
    folder = root / (layout.folder or name)
    if not folder.is_dir():
        raise _missing_folder(name, folder, layout)
    return layout.reader(folder, split, options)


def build_dataset(name: str, split: str, data_root: str | Path | None = None, image_size: int | None = None,
                  train: bool = False, transform: str | None = None,
                  allow_uncropped_cub: bool = False, tiered_labels: str = TIERED_LABELS[0],
                  rotation_classes: bool = False) -> FewShotDataset:
    """A split of a data set with its training (`train=True`) or test transform.

    image_size None means the data set's default (84; omniglot 28; glyphs 32). `transform` is a
    transform id ('A'..'E', 'O', 'K') overriding the data set's default. CUB val/test need the bounding-box
    crops unless `allow_uncropped_cub`. `tiered_labels`, `rotation_classes`: `ReadOptions`.
    """
    transform_id, image_size = input_transform_settings({"dataset": name}, image_size, transform)
    data = read_split(name, split, data_root, image_size, allow_uncropped_cub=allow_uncropped_cub,
                      tiered_labels=tiered_labels, rotation_classes=rotation_classes)
    common = dict(class_names=data.class_names, name=canonical_name(name), split=split, train=train,
                  class_groups=data.class_groups, drawers=data.drawers)
    if data.images is not None:
        dataset = ArrayDataset(data.images, data.labels, **common)
    else:
        dataset = FileDataset(data.paths, data.labels, **common)
    dataset.use_input_settings(TransformSettings.of(transform_id, image_size))
    return dataset


def stored_label_ranges(data: SplitData) -> dict[str, object]:
    """The class ids as the split's label files store them: per file its first and last id and how many, and,
    for a split joined from several files (tieredImageNet train), how many ids more than one file uses."""
    if not data.stored_class_ids:
        return {}
    ranges = {name: {"first": ids[0].item(), "last": ids[-1].item(), "ids": len(ids)}
              for name, ids in data.stored_class_ids.items()}
    if len(ranges) == 1:
        return {"stored_labels": ranges}
    ids, counts = np.unique(np.concatenate(list(data.stored_class_ids.values())), return_counts=True)
    return {"stored_labels": ranges, "shared_label_ids": int((counts > 1).sum())}


def summarize(name: str, data_root: str | Path | None = None) -> dict[str, dict]:
    """Per split: classes, images, image shape (None for file layouts with mixed sizes), the stored label
    ranges where the labels are stored as ids (`stored_label_ranges`) and the split's fingerprint
    (`bml.datasets.fingerprint`)."""
    summary = {}
    for split in (split for split in SPLITS if split in dataset_layout(name).splits):
        data = read_split(name, split, data_root, load_images=False, allow_uncropped_cub=True)
        shape = data.image_shape if data.paths is None else common_image_shape(data.paths)
        summary[split] = {"classes": len(data.class_names), "images": len(data.labels),
                          "image_shape": list(shape) if shape is not None else None, **stored_label_ranges(data),
                          "fingerprint": split_fingerprint(data.labels, shape, data.images, data.paths,
                                                           data.image_members)}
    return summary
