"""Dataset containers shared by every reader.

A split is held as ONE numpy array (uint8 images, or file paths as a fixed-width string array) plus
an int64 label array: DataLoader workers then share the pages of the parent process instead of
copying millions of Python objects (whose reference counts would touch every page).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

DATA_HELP = "see README, section Data"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""PIL modes of 16-bit images (mode "I" too: older Pillow versions open 16-bit PNGs so)."""
COMPLETE_FILE_ENDINGS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}
"""How a complete file of these formats ends; a file that ends otherwise is decoded in full to find out."""
BAD_IMAGES_LISTED = 10


def cache_dir() -> Path:
    """Where built data is kept (the glyphs set, decoded images): $BML_CACHE_DIR, default ~/.cache/bml."""
    return Path(os.environ.get("BML_CACHE_DIR") or Path.home() / ".cache" / "bml")


class DatasetError(ValueError):
    """A data problem the user can fix; the message says what is wrong and what to do."""


@dataclass
class SplitData:
    """What a reader returns: labels 0..C-1 and either the image array or the image paths.

    `images` may be None when the reader was asked for metadata only (`load_images=False`);
    `image_shape` then still says what the images are.
    """

    labels: np.ndarray
    class_names: list[str]
    images: np.ndarray | None = None
    paths: np.ndarray | None = None
    image_shape: tuple[int, int, int] | None = None


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


def image_to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image; 16-bit (0..65535) and float (0..1) images are scaled to 8 bits with their range
    preserved (PIL's own conversion clips them), float images outside 0..1 are refused."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" else 65535.0
        if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= top):
            raise DatasetError(f"a {image.mode} image with values {pixels.min():g}..{pixels.max():g}, outside "
                               f"0..{top:g}: convert it to an 8-bit image")
        image = Image.fromarray(np.rint(pixels * (255 / top)).astype(np.uint8))
    return image.convert("RGB")


def _ends_complete(path: Path, image_format: str | None) -> bool:
    endings = COMPLETE_FILE_ENDINGS.get(image_format or "")
    if not endings:
        return False
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - 64))
        tail = file.read().rstrip(b"\x00")
    return tail.endswith(endings)


def image_problem(path: str | Path) -> str | None:
    """Why the file at `path` is not a usable image (None when it is): not an image, truncated, a
    decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS), or a 16-bit/float range `image_to_rgb`
    refuses. Reads the header and the file's end; decodes in full only files that do not end as their
    format should, or whose pixel range must be checked."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
                    image_to_rgb(image)
                elif not _ends_complete(path, image.format):
                    image.load()
    except (OSError, SyntaxError, ValueError, DatasetError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_image_files(paths: Sequence[str], source: str) -> None:
    """Raise DatasetError listing the files that are not usable images, when a data set is opened."""
    bad = [(path, problem) for path in paths if (problem := image_problem(path))]
    if bad:
        listing = "\n".join(f"  {path} ({problem})" for path, problem in bad[:BAD_IMAGES_LISTED])
        more = f"\n  ... and {len(bad) - BAD_IMAGES_LISTED} more" if len(bad) > BAD_IMAGES_LISTED else ""
        raise DatasetError(f"{source}: {len(bad)} of {len(paths)} image files are not usable images; delete or "
                           f"replace them:\n{listing}{more}")


def read_image_sizes(paths: np.ndarray) -> np.ndarray:
    """(N, 2) array of (height, width), read from the file headers only (no pixel decoding)."""
    sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            sizes[i] = image.height, image.width
    return sizes


def common_image_shape(paths: np.ndarray) -> tuple[int, int, int] | None:
    """(H, W, 3) when every image has the same size, else None."""
    sizes = read_image_sizes(paths)
    if len(sizes) == 0 or (sizes != sizes[0]).any():
        return None
    return int(sizes[0, 0]), int(sizes[0, 1]), 3


class FewShotDataset(torch.utils.data.Dataset):
    """A split of a few-shot data set: `ds[i]` is (normalised 3 x S x S tensor, int label)."""

    def __init__(self, labels: np.ndarray, class_names: list[str], transform: Callable | None = None,
                 name: str = "", split: str = "", transform_id: str | None = None, image_size: int | None = None,
                 train: bool | None = None):
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.transform = transform
        self.name, self.split = name, split
        # what `transform` was built from: transform id, input size, training (True) or test (False) transform
        self.transform_id, self.image_size, self.train = transform_id, image_size, train

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
        from .decoded import open_decoded_images

        if self.decoded is None:
            self.decoded = open_decoded_images(self.paths, super().load_array, f"{self.name} {self.split}")

    def load_array(self, index: int) -> np.ndarray:
        return self.decoded[index] if self.decoded is not None else super().load_array(index)
