"""Readers for the file layouts of the README's "Data" table and the generic image folder.

Each reader maps (dataset folder, split, `ReadOptions`) to a SplitData with labels remapped to 0..C-1 in
sorted order of the original class ids, and says precisely which file it expected when one is missing.
What each layout's folder holds (`*_FILES`) is stated here once; the data sets table
(`bml.datasets.factory.DATASETS`) names it in messages and help.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from bml.utils.messages import warn

from .base import ReadOptions, SplitData, check_images, remap_labels
from .errors import DATA_HELP, DatasetError
from .npz import npz_array_shape, read_npz_arrays
from .safe_pickle import load_pickle

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

MINI_IMAGENET_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
CIFAR_FILES = {split: f"{split}.pickle" for split in ("train", "val", "test")}
TIERED_FILES = tuple(f"{split}_{kind}" for kind in ("images.npz", "labels.pkl") for split in CIFAR_FILES)
CUB_FILES = ("CUB_200_2011/images/<class>/<image>.jpg", "CUB_200_2011/split/{train,val,test}.csv",
             "optionally CUB_test/ (the bounding-box crops) with CUB_test/split/{val,test}.csv")
IMAGE_FOLDER_FILES = ("<split>/<class>/<image>",)
TIERED_LABELS = ("offset", "raw")
"""How tieredImageNet's train split (train + val) is labelled: 'offset', val's classes numbered after train's
(448 classes, this toolkit's default); 'raw', the stored labels concatenated as the original code did."""


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"expected {path.name} under {path.parent}: {DATA_HELP}")
    return path


def _stack_images(data, source: str) -> np.ndarray:
    """Pickled `data` as one uint8 array; some releases store a list of per-image arrays."""
    if isinstance(data, np.ndarray) and data.dtype != object:
        return data
    shapes = {np.shape(image) for image in data}
    if len(shapes) > 1:
        raise DatasetError(
            f"{source}: images of mixed sizes {sorted(shapes)[:3]}...; an array file needs one size: "
            f"resize them, or use the image-folder layout ({DATA_HELP})"
        )
    return np.stack([np.asarray(image) for image in data]) if len(data) else np.asarray(data)


def _pickle_fields(payload, keys: tuple[str, ...], source: str) -> list:
    if not isinstance(payload, dict) or any(key not in payload for key in keys):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise DatasetError(f"{source}: expected a dict with keys {list(keys)}, found {found}; {DATA_HELP}")
    return [payload[key] for key in keys]


def _class_names(class_ids: np.ndarray, payload: dict) -> list[str]:
    """Names from the pickle's optional `catname2label` dict, else the original ids."""
    names = {label: str(name) for name, label in payload.get("catname2label", {}).items()}
    return [names.get(class_id.item(), str(class_id.item())) for class_id in class_ids]


def read_pickle_split(dataset_dir: Path, split: str, options: ReadOptions = ReadOptions(), *,
                      files: dict[str, str]) -> SplitData:
    """miniImageNet, CIFAR-FS, FC100: a pickled dict with `data` (N x H x W x 3) and `labels`, in the file
    `files[split]` (no option applies)."""
    path = require_file(dataset_dir / files[split])
    payload = load_pickle(path)
    data, original_labels = _pickle_fields(payload, ("data", "labels"), str(path))
    images = _stack_images(data, str(path))
    labels, class_ids = remap_labels(original_labels, str(path))
    check_images(images, labels, str(path))
    return SplitData(labels=labels, class_names=_class_names(class_ids, payload), images=images,
                     image_shape=images.shape[1:], stored_class_ids={path.name: class_ids})


def _offset_labels(stored: dict[str, np.ndarray], folder: Path) -> tuple[np.ndarray, list[str]]:
    """Each file's class ids numbered 0..C-1 in sorted order, each file's after the previous one's."""
    labels, class_names, offset = [], [], 0
    for name, original in stored.items():
        part_labels, class_ids = remap_labels(original, str(folder / name))
        labels.append(part_labels + offset)
        part = name.removesuffix("_labels.pkl")
        class_names += [f"{part}/{class_id}" if len(stored) > 1 else str(class_id) for class_id in class_ids.tolist()]
        offset += len(class_ids)
    return np.concatenate(labels), class_names


def _raw_labels(stored: dict[str, np.ndarray], folder: Path) -> tuple[np.ndarray, list[str]]:
    """The original code's train + val: the stored labels concatenated as they are, taken as the outputs of a
    classifier as wide as both files' classes together (448). Where the files' ids overlap, classes of different
    files share an output; outputs that no file uses have no image."""
    class_ids = {name: remap_labels(original, str(folder / name))[1] for name, original in stored.items()}
    width = sum(len(ids) for ids in class_ids.values())
    joined = np.concatenate(list(stored.values()))
    if joined.dtype.kind not in "iu" or joined.min() < 0 or joined.max() >= width:
        raise DatasetError(f"{folder}: --tiered_labels raw takes the stored labels as classifier outputs "
                           f"0..{width - 1}, but they are {joined.dtype} {joined.min()}..{joined.max()}: use "
                           "--tiered_labels offset")
    users: list[list[str]] = [[] for _ in range(width)]
    for name, ids in class_ids.items():
        for class_id in ids.tolist():
            users[class_id].append(f"{name.removesuffix('_labels.pkl')}/{class_id}")
    return joined.astype(np.int64), ["+".join(names) or f"unused/{k}" for k, names in enumerate(users)]


def read_tiered(dataset_dir: Path, split: str, options: ReadOptions = ReadOptions()) -> SplitData:
    """tieredImageNet: `{split}_images.npz` + `{split}_labels.pkl`; 'train' is train + val (448 classes).

    `options.tiered_labels` says how train + val are labelled (`TIERED_LABELS`). The joined images are read
    straight into one preallocated array (never two copies of 9.5 GB); `options.load_images=False` reads the
    labels and the npz headers only.
    """
    parts = ("train", "val") if split == "train" else (split,)
    image_files = [require_file(dataset_dir / f"{part}_images.npz") for part in parts]
    stored = {}
    for part in parts:
        path = require_file(dataset_dir / f"{part}_labels.pkl")
        (original,) = _pickle_fields(load_pickle(path), ("labels",), str(path))
        stored[path.name] = np.asarray(original)
    if options.tiered_labels not in TIERED_LABELS:
        raise DatasetError(f"tiered_labels {options.tiered_labels!r}: expected one of {', '.join(TIERED_LABELS)}")
    if options.tiered_labels == "raw" and len(parts) > 1:
        labels, class_names = _raw_labels(stored, dataset_dir)
    else:
        labels, class_names = _offset_labels(stored, dataset_dir)
    shapes = [npz_array_shape(path, "images")[0] for path in image_files]
    num_images = sum(shape[0] for shape in shapes)
    if num_images != len(labels):
        raise DatasetError(
            f"{dataset_dir}: {num_images} images in {[p.name for p in image_files]} but {len(labels)} labels; "
            f"the files do not belong together ({DATA_HELP})"
        )
    images = read_npz_arrays([(path, "images") for path in image_files]) if options.load_images else None
    if images is not None:
        check_images(images, labels, str(image_files[0]))
    return SplitData(labels=labels, class_names=class_names, images=images, image_shape=tuple(shapes[0][1:]),
                     image_members=() if images is not None else tuple((path, "images") for path in image_files),
                     stored_class_ids={name: np.unique(original) for name, original in stored.items()})


def _read_split_csv(path: Path) -> tuple[list[str], list[str]]:
    """CUB split csv: a header line, then `filename,class_name` rows."""
    with open(require_file(path), newline="") as f:
        rows = [row for row in csv.reader(f)][1:]
    rows = [[field.strip() for field in row[:2]] for row in rows if row]
    if not rows or any(len(row) < 2 for row in rows):
        raise DatasetError(f"{path}: expected a header line, then `filename,class_name` rows; {DATA_HELP}")
    filenames, classes = zip(*rows)
    return list(filenames), list(classes)


def _resolve_listed_files(image_dir: Path, filenames: list[str], classes: list[str], source: Path) -> np.ndarray:
    """Paths of the listed files, either `<image_dir>/<class>/<file>` or `<image_dir>/<file>`."""
    candidates = [image_dir / classes[0] / filenames[0], image_dir / filenames[0]]
    if candidates[0].is_file():
        paths = [str(image_dir / c / f) for f, c in zip(filenames, classes)]
    elif candidates[1].is_file():
        paths = [str(image_dir / f) for f in filenames]
    else:
        raise DatasetError(f"{source} lists {filenames[0]}, expected at {candidates[0]} or {candidates[1]}; {DATA_HELP}")
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} images listed in {source} are missing, e.g. {missing[0]}; {DATA_HELP}")
    return np.array(paths, dtype=np.str_)


def read_cub(dataset_dir: Path, split: str, options: ReadOptions = ReadOptions()) -> SplitData:
    """CUB: `CUB_200_2011/images` + `split/{split}.csv`; val/test from the bounding-box crops in `CUB_test/`.

    The crops are the published test protocol: without them val/test stop with a DatasetError, unless
    `options.allow_uncropped`, which reads the uncropped images with a warning.
    """
    cropped = dataset_dir / "CUB_test"
    cropped_split = cropped / "split" / f"{split}.csv"
    if split != "train" and cropped_split.is_file():
        split_file, image_dir = cropped_split, cropped
    else:
        if split != "train" and not options.allow_uncropped:
            raise DatasetError(
                f"CUB {split} images come from the bounding-box crops in {cropped}/ (the published protocol), but "
                f"{cropped_split} is missing: put the original release's CUB_test/ folder there, or pass "
                f"--allow_uncropped_cub to use the uncropped CUB_200_2011 images (not the published protocol)")
        if split != "train":
            warn(f"{cropped_split} is missing: CUB {split} uses the uncropped CUB_200_2011 images "
                 "(--allow_uncropped_cub), not the published bounding-box crops")
        split_file, image_dir = dataset_dir / "CUB_200_2011" / "split" / f"{split}.csv", dataset_dir / "CUB_200_2011" / "images"
    filenames, classes = _read_split_csv(split_file)
    paths = _resolve_listed_files(image_dir, filenames, classes, split_file)
    labels, class_ids = remap_labels(classes, str(split_file))
    return SplitData(labels=labels, class_names=[str(c) for c in class_ids], paths=paths)


def read_image_folder(dataset_dir: Path, split: str, options: ReadOptions = ReadOptions()) -> SplitData:
    """`<dataset_dir>/<split>/<class>/<image>`: class folders in sorted order; empty folders are skipped (no
    option applies)."""
    split_dir = dataset_dir / split
    if not split_dir.is_dir():
        raise DatasetError(f"expected the folder {split_dir} holding <class>/<image> files: {DATA_HELP}")
    paths, names, seen = [], [], set()
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.resolve() in seen:   # a link to another class folder is that class, not a second one
            continue
        seen.add(class_dir.resolve())
        files = sorted(str(p) for p in class_dir.iterdir()   # a dangling link is listed, to be reported
                       if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink()))
        if files:
            paths += files
            names += [class_dir.name] * len(files)
    if not paths:
        raise DatasetError(f"no images found in {split_dir}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)}): {DATA_HELP}")
    labels, class_ids = remap_labels(names, str(split_dir))
    return SplitData(labels=labels, class_names=[str(c) for c in class_ids], paths=np.array(paths, dtype=np.str_))
