"""Omniglot under its two protocols: the Vinyals et al. split (`omniglot`: every (character, rotation) listed is
a class) and Lake et al.'s (`omniglot-lake`: learn from the 30 background alphabets, test on the 20 evaluation
alphabets, which nothing of training or validation sees).

The Lake split: train is every background character outside the val alphabets (with `ReadOptions.rotation_classes`
each character's four rotations are four classes), val the characters of a fixed set of background alphabets
(`<root>/splits/omniglot/lake/val_alphabets.txt` when that exists, else the packaged `splits/omniglot_lake/`), test
every evaluation character, upright. Both readers record each class's alphabet as its group and each image's
drawer, for episodes within one alphabet whose support and query images are by different people
(`bml.datasets.sampler.EpisodeRule`).

Reads `<root>/omniglot`: the npz arrays (`images_{background,evaluation}.npz`, rows located through
`alphabets.csv`) when present, which avoids decoding 32k PNGs, else the PNG trees
`images_{background,evaluation}/<Alphabet>/characterNN/*.png`. The split lists come from
`<root>/splits/omniglot/vinyals/<split>.txt` when that exists, else from the copy shipped in this
package (`splits/omniglot_vinyals/`, MIT, jakesnell/prototypical-networks). Images are resized to the
input size once at load time, rotated (counter-clockwise, as PIL's `rotate`) and stored as uint8 RGB.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .base import ReadOptions, SplitData, remap_labels
from .errors import DATA_HELP, DatasetError

OMNIGLOT_SPLITS = ("train", "val", "test", "trainval")
LAKE_SPLITS = ("train", "val", "test")
OMNIGLOT_FILES = ("images_{background,evaluation}.npz with alphabets.csv",
                  "or images_{background,evaluation}/<Alphabet>/characterNN/*.png")
OMNIGLOT_IMAGE_SIZE = 28
PACKAGED_SPLITS = Path(__file__).parent / "splits" / "omniglot_vinyals"
PACKAGED_LAKE_VAL = Path(__file__).parent / "splits" / "omniglot_lake" / "val_alphabets.txt"
IMAGE_SETS = ("images_background", "images_evaluation")
BACKGROUND, EVALUATION = IMAGE_SETS
ROTATIONS = (0, 90, 180, 270)
_DRAWER = re.compile(r"_(?P<drawer>\d+)\.png$")
_CLASS_LINE = re.compile(r"^(?P<alphabet>[^/]+)/character(?P<number>\d+)/rot(?P<angle>000|090|180|270)$")


def split_file(data_root: Path, split: str) -> Path:
    """The data root's copy of the Vinyals split list if it has one, else the packaged copy."""
    local = data_root / "splits" / "omniglot" / "vinyals" / f"{split}.txt"
    return local if local.is_file() else PACKAGED_SPLITS / f"{split}.txt"


def read_split_list(path: Path) -> list[str]:
    """Class lines `Alphabet/characterNN/rotDDD`, validated."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [line for line in lines if not _CLASS_LINE.match(line)]
    if bad or not lines:
        raise DatasetError(f"{path}: expected lines `Alphabet/characterNN/rotDDD`, found {bad[:1] or 'none'}")
    return lines


def _character_ids(omniglot_dir: Path) -> dict[str, tuple[str, int]]:
    """`Alphabet/characterNN` -> (image set, row in its npz), from alphabets.csv.

    Character ids are global (background 1..964, evaluation 965..1623); a set's npz row is the id minus
    the smallest id of that set.
    """
    with open(omniglot_dir / "alphabets.csv", newline="") as f:
        records = list(csv.DictReader(f))
    set_start = {}
    for record in records:
        set_start[record["set"]] = min(set_start.get(record["set"], 10**9), int(record["first_char_id"]))
    rows = {}
    for record in records:
        first, last = int(record["first_char_id"]), int(record["last_char_id"])
        for char_id in range(first, last + 1):
            name = f"{record['alphabet']}/character{char_id - first + 1:02d}"
            rows[name] = (record["set"], char_id - set_start[record["set"]])
    return rows


def lake_val_file(data_root: Path) -> Path:
    """The data root's list of the Lake split's val alphabets if it has one, else the packaged list."""
    local = data_root / "splits" / "omniglot" / "lake" / "val_alphabets.txt"
    return local if local.is_file() else PACKAGED_LAKE_VAL


def alphabet_sizes(omniglot_dir: Path) -> dict[str, dict[str, int]]:
    """Image set -> {alphabet: characters}, from alphabets.csv, else from the PNG folders."""
    sizes: dict[str, dict[str, int]] = {image_set: {} for image_set in IMAGE_SETS}
    if (omniglot_dir / "alphabets.csv").is_file():
        with open(omniglot_dir / "alphabets.csv", newline="") as f:
            for record in csv.DictReader(f):
                sizes[record["set"]][record["alphabet"]] = int(record["n_characters"])
        return sizes
    for image_set in IMAGE_SETS:
        for folder in sorted(p for p in (omniglot_dir / image_set).glob("*") if p.is_dir()):
            sizes[image_set][folder.name] = sum(1 for p in folder.glob("character*") if p.is_dir())
    if not any(sizes.values()):
        raise DatasetError(f"{omniglot_dir} has neither alphabets.csv nor images_background/<Alphabet>/ folders; "
                           f"{DATA_HELP}")
    return sizes


def lake_class_lines(omniglot_dir: Path, split: str, rotation_classes: bool = False) -> list[str]:
    """The classes `Alphabet/characterNN/rotDDD` of a Lake split: train and val from the background alphabets
    (disjoint), test from the evaluation alphabets; rotations other than 0 only in train with `rotation_classes`."""
    sizes = alphabet_sizes(omniglot_dir)
    val_file = lake_val_file(omniglot_dir.parent)
    val = [line.strip() for line in val_file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    stray = [alphabet for alphabet in val if alphabet not in sizes[BACKGROUND]]
    if stray or not val:
        raise DatasetError(f"{val_file}: every val alphabet must be one of the background alphabets of "
                           f"{omniglot_dir}, found {stray[:1] or 'none'}")
    alphabets = {"train": [a for a in sizes[BACKGROUND] if a not in val], "val": val,
                 "test": list(sizes[EVALUATION])}[split]
    angles = ROTATIONS if split == "train" and rotation_classes else ROTATIONS[:1]
    sizes = {**sizes[BACKGROUND], **sizes[EVALUATION]}
    return [f"{alphabet}/character{number:02d}/rot{angle:03d}" for alphabet in alphabets
            for number in range(1, sizes[alphabet] + 1) for angle in angles]


def _resized(image: Image.Image, size: int) -> np.ndarray:
    """Grey size x size pixels, antialiased bilinear (as torchvision's Resize on PIL images)."""
    image = image.convert("L")
    return np.asarray(image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR))


def _load_npz(omniglot_dir: Path, characters: list[str], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, the character of each, the drawer of each: the npz column)."""
    ids = _character_ids(omniglot_dir)
    unknown = [c for c in characters if c not in ids]
    if unknown:
        raise DatasetError(f"{omniglot_dir / 'alphabets.csv'} has no character {unknown[0]}; {DATA_HELP}")
    images, owners, drawers = [], [], []
    for image_set in IMAGE_SETS:
        wanted = [(k, ids[c][1]) for k, c in enumerate(characters) if ids[c][0] == image_set]
        if not wanted:
            continue
        with np.load(omniglot_dir / f"{image_set}.npz", allow_pickle=False) as archive:
            pixels = archive["images"][[row for _, row in wanted]]          # (n, drawers, H, W)
        gray = pixels.astype(np.uint8) * 255 if pixels.dtype == bool else pixels.astype(np.uint8)
        images.append(np.stack([_resized(Image.fromarray(image), size) for image in gray.reshape(-1, *gray.shape[2:])]))
        owners.append(np.repeat([k for k, _ in wanted], gray.shape[1]))
        drawers.append(np.tile(np.arange(gray.shape[1]), len(wanted)))
    return np.concatenate(images), np.concatenate(owners), np.concatenate(drawers)


def _load_png(omniglot_dir: Path, characters: list[str], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, the character of each, the drawer of each: `YY` - 1 of the file name `XXXX_YY.png`)."""
    images, owners, drawers = [], [], []
    for k, character in enumerate(characters):
        folders = [omniglot_dir / image_set / character for image_set in IMAGE_SETS]
        files = sorted(p for folder in folders if folder.is_dir() for p in folder.glob("*.png"))
        if not files:
            raise DatasetError(
                f"no images for {character}: expected {folders[0]}/*.png or {folders[1]}/*.png, or the npz "
                f"arrays with alphabets.csv under {omniglot_dir}; {DATA_HELP}"
            )
        for file in files:
            with Image.open(file) as image:
                images.append(_resized(image, size))
            drawer = _DRAWER.search(file.name)
            drawers.append(int(drawer["drawer"]) - 1 if drawer else -1)
        owners += [k] * len(files)
    return np.stack(images), np.array(owners), np.array(drawers)


def _has_npz(omniglot_dir: Path) -> bool:
    return (omniglot_dir / "alphabets.csv").is_file() and all(
        (omniglot_dir / f"{image_set}.npz").is_file() for image_set in IMAGE_SETS)


def read_omniglot(omniglot_dir: Path, split: str, options: ReadOptions = ReadOptions()) -> SplitData:
    """The (character, rotation) classes of a Vinyals split of `<root>/omniglot`, images `options.image_size`
    px (default OMNIGLOT_IMAGE_SIZE) uint8 RGB."""
    return read_classes(omniglot_dir, sorted(read_split_list(split_file(omniglot_dir.parent, split))), split, options)


def read_omniglot_lake(omniglot_dir: Path, split: str, options: ReadOptions = ReadOptions()) -> SplitData:
    """A split of Lake et al.'s protocol (`lake_class_lines`), images `options.image_size` px uint8 RGB."""
    return read_classes(omniglot_dir, sorted(lake_class_lines(omniglot_dir, split, options.rotation_classes)), split,
                        options)


def read_classes(omniglot_dir: Path, class_lines: list[str], split: str, options: ReadOptions) -> SplitData:
    """Classes `Alphabet/characterNN/rotDDD` of `<root>/omniglot`, each with all images of its character turned
    by its angle, the alphabet as its group and every image's drawer recorded."""
    class_characters = [line.rsplit("/", 1)[0] for line in class_lines]
    characters = sorted(set(class_characters))
    load = _load_npz if _has_npz(omniglot_dir) else _load_png
    gray, owner, drawer = load(omniglot_dir, characters, int(options.image_size or OMNIGLOT_IMAGE_SIZE))

    # Each class takes all images of its character: gather them from the images sorted by character.
    per_character = np.bincount(owner, minlength=len(characters))
    character_index = np.searchsorted(characters, class_characters)
    counts, starts = per_character[character_index], (np.cumsum(per_character) - per_character)[character_index]
    class_of_image = np.repeat(np.arange(len(class_lines)), counts)
    within_class = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    image_index = np.argsort(owner, kind="stable")[np.repeat(starts, counts) + within_class]
    quarter_turns = np.array([int(line[-3:]) // 90 for line in class_lines])[class_of_image]
    images = gray[image_index]
    for turns in (1, 2, 3):
        selected = quarter_turns == turns
        images[selected] = np.rot90(images[selected], turns, axes=(1, 2))
    labels, _ = remap_labels(class_of_image, split)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    return SplitData(labels=labels, class_names=class_lines, images=rgb, image_shape=rgb.shape[1:],
                     class_groups=[line.split("/", 1)[0] for line in class_lines], drawers=drawer[image_index])
