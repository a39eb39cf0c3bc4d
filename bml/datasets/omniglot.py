"""Omniglot with the Vinyals et al. split: every (character, rotation) listed is a class.

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
OMNIGLOT_FILES = ("images_{background,evaluation}.npz with alphabets.csv",
                  "or images_{background,evaluation}/<Alphabet>/characterNN/*.png")
OMNIGLOT_IMAGE_SIZE = 28
PACKAGED_SPLITS = Path(__file__).parent / "splits" / "omniglot_vinyals"
IMAGE_SETS = ("images_background", "images_evaluation")
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


def _resized(image: Image.Image, size: int) -> np.ndarray:
    """Grey size x size pixels, antialiased bilinear (as torchvision's Resize on PIL images)."""
    image = image.convert("L")
    return np.asarray(image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR))


def _load_npz(omniglot_dir: Path, characters: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    ids = _character_ids(omniglot_dir)
    unknown = [c for c in characters if c not in ids]
    if unknown:
        raise DatasetError(f"{omniglot_dir / 'alphabets.csv'} has no character {unknown[0]}; {DATA_HELP}")
    images, owners = [], []
    for image_set in IMAGE_SETS:
        wanted = [(k, ids[c][1]) for k, c in enumerate(characters) if ids[c][0] == image_set]
        if not wanted:
            continue
        with np.load(omniglot_dir / f"{image_set}.npz", allow_pickle=False) as archive:
            pixels = archive["images"][[row for _, row in wanted]]          # (n, drawers, H, W)
        gray = pixels.astype(np.uint8) * 255 if pixels.dtype == bool else pixels.astype(np.uint8)
        images.append(np.stack([_resized(Image.fromarray(image), size) for image in gray.reshape(-1, *gray.shape[2:])]))
        owners.append(np.repeat([k for k, _ in wanted], gray.shape[1]))
    return np.concatenate(images), np.concatenate(owners)


def _load_png(omniglot_dir: Path, characters: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    images, owners = [], []
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
        owners += [k] * len(files)
    return np.stack(images), np.array(owners)


def _has_npz(omniglot_dir: Path) -> bool:
    return (omniglot_dir / "alphabets.csv").is_file() and all(
        (omniglot_dir / f"{image_set}.npz").is_file() for image_set in IMAGE_SETS)


def read_omniglot(omniglot_dir: Path, split: str, options: ReadOptions = ReadOptions()) -> SplitData:
    """The (character, rotation) classes of a Vinyals split of `<root>/omniglot`, images `options.image_size`
    px (default OMNIGLOT_IMAGE_SIZE) uint8 RGB."""
    class_lines = sorted(read_split_list(split_file(omniglot_dir.parent, split)))
    class_characters = [line.rsplit("/", 1)[0] for line in class_lines]
    characters = sorted(set(class_characters))
    load = _load_npz if _has_npz(omniglot_dir) else _load_png
    gray, owner = load(omniglot_dir, characters, int(options.image_size or OMNIGLOT_IMAGE_SIZE))

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
    return SplitData(labels=labels, class_names=class_lines, images=rgb, image_shape=rgb.shape[1:])
