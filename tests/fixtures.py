"""Tiny fake data sets in every supported layout, generated on the fly (never the real data), and a
checkpoint in the authors' released format.

Every data generator writes under `root` (a data root) and returns `root`. Array images encode their
original class id in pixel [0, 0, 0] (ids are < 256), so tests can check the label remapping.
Import from tests as `from fixtures import make_cub` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import argparse
import csv
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SPLITS = ("train", "val", "test")
PICKLE_FILES = {
    "miniImageNet": {"train": "miniImageNet_category_split_train_phase_train.pickle",
                     "val": "miniImageNet_category_split_val.pickle",
                     "test": "miniImageNet_category_split_test.pickle"},
    "CIFAR-FS": {split: f"{split}.pickle" for split in SPLITS},
    "FC100": {split: f"{split}.pickle" for split in SPLITS},
}


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING): what the benchmark pickles, written by Python 2, hold."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def write_python2_pickle(path: str | Path, obj) -> Path:
    """write_python2_pickle(path, obj) -> path: protocol 2, bytes as Python 2 str, numpy 1.x module names."""
    import io

    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    Path(path).write_bytes(data)
    return Path(path)


def save_released_checkpoint(path: str | Path, weights: torch.nn.Module | Mapping[str, torch.Tensor],
                             **config) -> Path:
    """save_released_checkpoint(path, weights, **config) -> path

    The authors' released format, written with plain torch.save as their files were: {'model': the state
    dict of `weights` (a model or a state dict), 'max_accuracy', 'epoch', 'config': the original's
    argparse.Namespace of `config` (e.g. dataset='miniImageNet', backbone='Res12')}.
    """
    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
    torch.save({"model": state_dict, "max_accuracy": 0.0, "epoch": 1, "config": argparse.Namespace(**config)}, path)
    return Path(path)


def _class_ids(rng: np.random.Generator, count: int, low: int = 0) -> np.ndarray:
    """`count` distinct ids in [low, 256), in random (unsorted) order."""
    return rng.choice(np.arange(low, 256), size=count, replace=False)


def _array_images(ids_per_image: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 256, size=(len(ids_per_image), image_size, image_size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = ids_per_image
    return images


def make_pickle_split_dataset(root: str | Path, name: str, classes: tuple[int, int, int] = (5, 4, 4),
                              images_per_class: int = 6, image_size: int = 8, label_format: str = "list",
                              catname2label: bool = False, seed: int = 0) -> Path:
    """make_pickle_split_dataset(root, name, classes=(5, 4, 4), images_per_class=6, image_size=8,
    label_format='list', catname2label=False, seed=0) -> root

    name: 'miniImageNet' | 'CIFAR-FS' | 'FC100' (their file names). Each pickle is a Python 2 style dict
    {'data': N x S x S x 3 uint8, 'labels': ...} with arbitrary unsorted class ids; label_format:
    'list' (Python ints), 'scalars' (list of numpy int64) or 'array'. catname2label adds
    {'catname2label': {'n<id>': id}} (class names).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, classes):
        ids = _class_ids(rng, count)
        labels = rng.permutation(np.repeat(ids, images_per_class))
        payload = {"data": _array_images(labels, image_size, rng),
                   "labels": {"list": labels.tolist(), "scalars": list(labels), "array": labels}[label_format]}
        if catname2label:
            payload["catname2label"] = {f"n{i:04d}": int(i) for i in ids}
        write_python2_pickle(folder / PICKLE_FILES[name][split], payload)
    return Path(root)


def make_cifar_fs_bml_checkpoint(folder: str | Path, images_per_class: int = 16) -> tuple[Path, Path]:
    """A width-0.125 BML released checkpoint of CIFAR-FS (6 base classes, 32 px) and its data root."""
    from bml.models import BML   # here: the fixtures of the data tests do not need the models

    folder = Path(folder)
    data_root = make_pickle_split_dataset(folder / "data", "CIFAR-FS", classes=(6, 5, 5),
                                          images_per_class=images_per_class, image_size=32)
    checkpoint = save_released_checkpoint(folder / "bml.pth", BML(num_classes=6, width=0.125),
                                          dataset="CIFAR-FS", backbone="Res12", image_size=32)
    return checkpoint, data_root


def make_tiered(root: str | Path, classes: tuple[int, int, int] = (4, 3, 5), images_per_class: int = 6,
                image_size: int = 8, compressed: bool = False, seed: int = 0, offset_ids: bool = False) -> Path:
    """make_tiered(root, classes=(4, 3, 5), images_per_class=6, image_size=8, compressed=False, seed=0,
    offset_ids=False) -> root

    `<root>/tieredImageNet/{split}_images.npz` (key 'images') + `{split}_labels.pkl` ({'labels': list}).
    Class ids of each split are 0..C-1 shuffled, so train and val ids overlap; with offset_ids each split's
    ids continue after the previous split's (val's after train's), the other kind of release.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "tieredImageNet"
    folder.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    first_ids = np.cumsum((0, *classes[:-1])) if offset_ids else (0, 0, 0)
    for split, count, first_id in zip(SPLITS, classes, first_ids):
        labels = first_id + rng.permutation(np.repeat(rng.permutation(count), images_per_class))
        save(folder / f"{split}_images.npz", images=_array_images(labels, image_size, rng))
        write_python2_pickle(folder / f"{split}_labels.pkl", {"labels": labels.tolist()})
    return Path(root)


def _write_image(path: Path, size: tuple[int, int], mode: str, rng: np.random.Generator) -> None:
    """A random image of `size` (width, height) in PIL `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image = image.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
    image.save(path)


def make_cub(root: str | Path, classes: tuple[int, int, int] = (4, 3, 3), images_per_class: int = 5,
             image_size: tuple[int, int] = (12, 10), cropped_test: bool = False,
             cropped_size: tuple[int, int] = (9, 9), seed: int = 0) -> Path:
    """make_cub(root, classes=(4, 3, 3), images_per_class=5, image_size=(12, 10), cropped_test=False,
    cropped_size=(9, 9), seed=0) -> root

    `<root>/CUB/CUB_200_2011/images/<NNN.Name>/<Name>_<k>.jpg` (size = (width, height)) and
    `CUB_200_2011/split/{train,val,test}.csv` (header, then `filename,class_name`). With cropped_test,
    also `CUB_test/<filename>` crops of size cropped_size and `CUB_test/split/{val,test}.csv`.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "CUB"
    names = [f"{k + 1:03d}.Bird_{k + 1}" for k in range(sum(classes))]
    bounds = np.cumsum([0, *classes])
    for split, start, stop in zip(SPLITS, bounds[:-1], bounds[1:]):
        split_names = [names[k] for k in rng.permutation(np.arange(start, stop))]   # csv rows not sorted
        rows = [(f"{name.split('.')[1]}_{k}.jpg", name) for name in split_names for k in range(images_per_class)]
        sets = [("CUB_200_2011", image_size)] + ([("CUB_test", cropped_size)] if cropped_test and split != "train" else [])
        for base, size in sets:
            for filename, name in rows:
                image_path = folder / base / ("images/" + name if base == "CUB_200_2011" else "") / filename
                _write_image(image_path, size, "RGB", rng)
            (folder / base / "split").mkdir(parents=True, exist_ok=True)
            with open(folder / base / "split" / f"{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows([("filename", "label"), *rows])
    return Path(root)


def make_image_folder(root: str | Path, name: str, classes: tuple[int, int, int] = (4, 3, 3),
                      images_per_class: int = 5, image_size: int = 10,
                      modes: tuple[str, ...] = ("RGB", "L", "1", "P", "RGBA"), mixed_sizes: bool = False,
                      seed: int = 0) -> Path:
    """make_image_folder(root, name, classes=(4, 3, 3), images_per_class=5, image_size=10,
    modes=('RGB', 'L', '1', 'P', 'RGBA'), mixed_sizes=False, seed=0) -> root

    `<root>/<name>/{train,val,test}/class_<k>/img_<j>.png`, PIL modes cycling through `modes`; with
    mixed_sizes the first image of each class is one pixel wider.
    """
    rng = np.random.default_rng(seed)
    for split, count in zip(SPLITS, classes):
        for k in range(count):
            for j in range(images_per_class):
                width = image_size + (1 if mixed_sizes and j == 0 else 0)
                path = Path(root) / name / split / f"class_{k}" / f"img_{j}.png"
                _write_image(path, (width, image_size), modes[(k + j) % len(modes)], rng)
    return Path(root)


OMNIGLOT_ALPHABETS = (("images_background", "Alpha", 3), ("images_background", "Beta", 2),
                      ("images_evaluation", "Gamma", 3))
OMNIGLOT_SPLIT_ALPHABETS = {"train": ("Alpha",), "val": ("Beta",), "test": ("Gamma",)}
"""Which alphabets the fixture's Vinyals split lists give each split; its Lake split holds Beta out as val too."""


def make_omniglot(root: str | Path, drawers: int = 4, image_size: int = 21, npz: bool = True, png: bool = False,
                  split_files: bool = True, seed: int = 0) -> Path:
    """make_omniglot(root, drawers=4, image_size=21, npz=True, png=False, split_files=True, seed=0) -> root

    `<root>/omniglot/alphabets.csv` for OMNIGLOT_ALPHABETS (background Alpha 3 + Beta 2 characters,
    evaluation Gamma 3; global ids from 1), `images_{background,evaluation}.npz` ('images' bool
    (chars, drawers, S, S), True = paper; 'labels') and/or the PNG trees
    `images_*/<Alphabet>/characterNN/<id>_<drawer>.png` (mode '1', same pixels), and with split_files
    `<root>/splits/omniglot/vinyals/{train,val,test,trainval}.txt` (Alpha / Beta / Gamma, 4 rotations) and
    `<root>/splits/omniglot/lake/val_alphabets.txt` (Beta).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    rows, next_id, per_set = [], 1, {}
    for image_set, alphabet, count in OMNIGLOT_ALPHABETS:
        rows.append((image_set, alphabet, f"{next_id:04d}", f"{next_id + count - 1:04d}", count))
        ink = rng.random((count, drawers, image_size, image_size)) < 0.2
        per_set.setdefault(image_set, []).append((alphabet, next_id, ~ink))
        next_id += count
    with open(folder / "alphabets.csv", "w", newline="") as f:
        csv.writer(f).writerows([("set", "alphabet", "first_char_id", "last_char_id", "n_characters"), *rows])
    for image_set, alphabets in per_set.items():
        images = np.concatenate([paper for _, _, paper in alphabets])
        first_id = alphabets[0][1]
        if npz:
            ids = np.arange(first_id, first_id + len(images))
            np.savez_compressed(folder / f"{image_set}.npz", images=images,
                                labels=np.repeat(ids[:, None], drawers, axis=1))
        if png:
            for alphabet, start_id, paper in alphabets:
                for c, character in enumerate(paper):
                    for d, pixels in enumerate(character):
                        path = folder / image_set / alphabet / f"character{c + 1:02d}" / f"{start_id + c:04d}_{d + 1:02d}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(pixels).convert("1").save(path)
    if split_files:
        counts = {alphabet: count for _, alphabet, count in OMNIGLOT_ALPHABETS}
        split_dir = Path(root) / "splits" / "omniglot" / "vinyals"
        split_dir.mkdir(parents=True, exist_ok=True)
        lines = {split: [f"{a}/character{c + 1:02d}/rot{angle:03d}" for a in alphabets for c in range(counts[a])
                         for angle in (0, 90, 180, 270)]
                 for split, alphabets in OMNIGLOT_SPLIT_ALPHABETS.items()}
        lines["trainval"] = lines["train"] + lines["val"]
        for split, split_lines in lines.items():
            (split_dir / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
        lake_dir = Path(root) / "splits" / "omniglot" / "lake"
        lake_dir.mkdir(parents=True, exist_ok=True)
        (lake_dir / "val_alphabets.txt").write_text("# held out\n" + "\n".join(OMNIGLOT_SPLIT_ALPHABETS["val"]) + "\n")
    return Path(root)
