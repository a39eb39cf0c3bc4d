"""Every image of a file data set decoded once into one memory-mapped uint8 file, for `--augment device`.

CUB's training images are JPEG files of mixed sizes: decoding one costs a loader worker milliseconds,
many times what everything else costs it per image once the augmentation runs on the device. The
store decodes each file once (with the dataset's own decoding, so the pixels are the same) into one
flat uint8 array with each image's (offset, height, width); the loader workers share it through the
page cache and copy out only each image's crop box.

It lives under $BML_CACHE_DIR (default ~/.cache/bml), named by a digest of the files' paths, sizes and
modification times and of Pillow's version, so a changed file or decoder builds a new one. Both files
are written atomically; a build is skipped (with a warning, and the workers decode the files as before)
when the pixels would take more than half the free space there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bml.utils.io import atomic_write
from bml.utils.messages import info, warn
from bml.utils.progress import progress

from .errors import DatasetError
from .image_files import cache_dir, read_image_sizes

STORE_VERSION = 1
OFFSET, HEIGHT, WIDTH = 0, 1, 2


class DecodedImages:
    """`store[i]` is image i as an H x W x 3 uint8 array (a read-only view into the memory-mapped file).

    Pickled by path (a DataLoader worker maps the file itself, never a copy of the pixels)."""

    def __init__(self, pixels_path: Path, index: np.ndarray) -> None:
        self.pixels_path, self.index = Path(pixels_path), index
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.pixels_path, mmap_mode="r")
        offset, height, width = (int(value) for value in self.index[i])
        return self._pixels[offset:offset + height * width * 3].reshape(height, width, 3)

    def __getstate__(self) -> dict:
        return {"pixels_path": self.pixels_path, "index": self.index, "_pixels": None}


def store_paths(paths: np.ndarray) -> tuple[Path, Path]:
    """(pixels, index) files of the store of these image files."""
    import PIL

    digest = hashlib.sha256(f"v{STORE_VERSION} pillow={PIL.__version__}".encode())
    for path in paths.tolist():
        status = os.stat(path)
        digest.update(f"\n{os.path.abspath(path)} {status.st_size} {status.st_mtime_ns}".encode())
    stem = f"decoded_v{STORE_VERSION}_{len(paths)}_{digest.hexdigest()[:16]}"
    return cache_dir() / f"{stem}.npy", cache_dir() / f"{stem}.index.npy"


def read_store(pixels_path: Path, index_path: Path, count: int) -> DecodedImages | None:
    """The store when both files are there and agree, else None (it is then rebuilt)."""
    if not (pixels_path.is_file() and index_path.is_file()):
        return None
    try:
        index = np.load(index_path, allow_pickle=False)
        pixels = np.load(pixels_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if index.shape != (count, 3) or len(pixels) != int((index[:, HEIGHT] * index[:, WIDTH] * 3).sum()):
        return None
    return DecodedImages(pixels_path, index)


def open_decoded_images(paths: np.ndarray, decode: Callable[[int], np.ndarray], what: str
                        ) -> DecodedImages | None:
    """The store of the files `paths`, built on first use by `decode(i)` (image i as H x W x 3 uint8).

    None, with a warning, when the folder lacks the space (more than half its free space needed)
    or cannot be written: the caller then decodes the files on every access, as without a store.
    """
    pixels_path, index_path = store_paths(paths)
    store = read_store(pixels_path, index_path, len(paths))
    if store is not None:
        return store
    sizes = read_image_sizes(paths)
    needed = int((sizes[:, 0] * sizes[:, 1] * 3).sum())
    try:
        pixels_path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(pixels_path.parent).free
    except OSError as error:
        warn(f"cannot write the decoded images of {what} to {pixels_path.parent} ({error}): the loader "
             "decodes the files at every step instead (set BML_CACHE_DIR to a writable folder)")
        return None
    if needed > free // 2:
        warn(f"the decoded images of {what} would take {needed / 2**30:.1f} GB, more than half the free space "
             f"in {pixels_path.parent} ({free / 2**30:.1f} GB): the loader decodes the files at every step instead "
             "(set BML_CACHE_DIR to a larger disk to decode them once)")
        return None
    info(f"decoding the {len(paths)} images of {what} once into {pixels_path} ({needed / 2**30:.2f} GB; "
         "set BML_CACHE_DIR to put it elsewhere)")
    offsets = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1] * 3)[:-1]])
    try:
        with atomic_write(pixels_path) as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (needed,)})
            for i in progress(range(len(paths)), "decoding", unit="image"):
                image = decode(i)
                if image.shape != (*sizes[i], 3):
                    raise DatasetError(f"{paths[i]} decodes to {image.shape[:2]} pixels but its header says "
                                       f"{tuple(sizes[i])}: re-save the file")
                handle.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        with atomic_write(index_path) as handle:
            np.save(handle, np.column_stack([offsets, sizes]).astype(np.int64))
    except OSError as error:   # a full disk (OutputError says so), no permission
        warn(f"{error}; the loader decodes the files at every step instead")
        return None
    return read_store(pixels_path, index_path, len(paths))
