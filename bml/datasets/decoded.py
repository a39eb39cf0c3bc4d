"""Every image of a file data set decoded once into one memory-mapped uint8 file, for `--augment device`.

CUB's training images are JPEG files of mixed sizes: decoding one costs a loader worker milliseconds,
many times what everything else costs it per image once the augmentation runs on the device. The
store decodes each file once (with the dataset's own decoding, so the pixels are the same) into one
flat uint8 array with each image's (offset, height, width, checksum, source); the loader workers share it
through the page cache and copy out only each image's crop box.

It lives under $BML_CACHE_DIR (default ~/.cache/bml), named by a digest of Pillow's version and of every file's
path, size, modification time and content sample (its first and last `SAMPLE_BYTES`), so a changed file or decoder
builds a new one, also a file replaced by one of the same size and time. Both files are written atomically; a
build is skipped (with a warning, and the workers decode the files as before) when the pixels would take more
than half the free space there. When the store is opened every image's CRC-32 and the file it was decoded from
are checked (one sequential read of the store): a damaged or edited store is rebuilt, never served.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bml.utils.io import atomic_write
from bml.utils.messages import info, warn
from bml.utils.progress import progress

from .errors import DatasetError
from .image_files import cache_dir, read_image_sizes

STORE_VERSION = 2
OFFSET, HEIGHT, WIDTH, CHECKSUM, SOURCE = range(5)
"""The index's columns: where image i starts in the pixels, its size, the CRC-32 of its pixels and the digest of
its file (`source_digests`), which ties row i to file i."""
SAMPLE_BYTES = 64 * 1024
"""How much of each file's start and end its source digest reads."""


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
        offset, height, width = (int(value) for value in self.index[i, :CHECKSUM])
        return self._pixels[offset:offset + height * width * 3].reshape(height, width, 3)

    def __getstate__(self) -> dict:
        return {"pixels_path": self.pixels_path, "index": self.index, "_pixels": None}


def source_digests(paths: np.ndarray) -> np.ndarray:
    """(N,) int64: per file, a digest of its absolute path, size, modification time and first and last
    `SAMPLE_BYTES` (the whole of a smaller file)."""
    digests = np.empty(len(paths), dtype=np.int64)
    for i, path in enumerate(paths.tolist()):
        status = os.stat(path)
        digest = hashlib.sha256(f"{os.path.abspath(path)} {status.st_size} {status.st_mtime_ns}".encode())
        with open(path, "rb") as file:
            digest.update(file.read(SAMPLE_BYTES))
            if status.st_size > SAMPLE_BYTES:
                file.seek(max(SAMPLE_BYTES, status.st_size - SAMPLE_BYTES))
                digest.update(file.read(SAMPLE_BYTES))
        digests[i] = np.frombuffer(digest.digest()[:8], dtype="<i8")[0]
    return digests


def store_paths(sources: np.ndarray) -> tuple[Path, Path]:
    """(pixels, index) files of the store of the image files whose `source_digests` are `sources`."""
    import PIL

    digest = hashlib.sha256(f"v{STORE_VERSION} pillow={PIL.__version__}\n".encode())
    digest.update(np.ascontiguousarray(sources, dtype="<i8").tobytes())
    stem = f"decoded_v{STORE_VERSION}_{len(sources)}_{digest.hexdigest()[:16]}"
    return cache_dir() / f"{stem}.npy", cache_dir() / f"{stem}.index.npy"


def pixel_checksum(pixels: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(pixels)).cast("B"))


def store_problem(pixels: np.ndarray, index: np.ndarray, sources: np.ndarray) -> str | None:
    """What is wrong with a store (None when nothing): an index of another shape, rows of other files or out of
    place, a pixel count that does not add up, or an image whose CRC-32 differs from the one it was stored with."""
    if index.dtype != np.int64 or index.shape != (len(sources), SOURCE + 1):
        return f"an index of {index.dtype} {index.shape}, expected int64 {(len(sources), SOURCE + 1)}"
    wrong_files = np.flatnonzero(index[:, SOURCE] != sources)
    if len(wrong_files):
        return f"{len(wrong_files)} index rows belong to other files (the first: row {wrong_files[0]})"
    lengths = index[:, HEIGHT] * index[:, WIDTH] * 3
    if (index[:, [HEIGHT, WIDTH]] <= 0).any() or (index[:, OFFSET] != np.cumsum(lengths) - lengths).any() \
            or len(pixels) != int(lengths.sum()):
        return "image offsets and sizes that do not add up to the pixels"
    for i, (offset, length) in enumerate(zip(index[:, OFFSET].tolist(), lengths.tolist())):
        if pixel_checksum(pixels[offset:offset + length]) != index[i, CHECKSUM]:
            return f"the pixels of image {i} differ from those stored (CRC-32)"
    return None


def read_store(pixels_path: Path, index_path: Path, sources: np.ndarray) -> DecodedImages | None:
    """The store when both files are there and pass `store_problem`, else None (it is then rebuilt, with a warning
    when it was there but wrong)."""
    if not (pixels_path.is_file() and index_path.is_file()):
        return None
    try:
        index = np.load(index_path, allow_pickle=False)
        pixels = np.load(pixels_path, mmap_mode="r")
        problem = store_problem(pixels, index, sources)
    except (OSError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        warn(f"the decoded-image store {pixels_path} is damaged or was edited ({problem}): rebuilding it")
        return None
    return DecodedImages(pixels_path, index)


def open_decoded_images(paths: np.ndarray, decode: Callable[[int], np.ndarray], what: str
                        ) -> DecodedImages | None:
    """The store of the files `paths`, built on first use by `decode(i)` (image i as H x W x 3 uint8).

    None, with a warning, when the folder lacks the space (more than half its free space needed)
    or cannot be written: the caller then decodes the files on every access, as without a store.
    """
    sources = source_digests(paths)
    pixels_path, index_path = store_paths(sources)
    store = read_store(pixels_path, index_path, sources)
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
    checksums = np.empty(len(paths), dtype=np.int64)
    try:
        with atomic_write(pixels_path) as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (needed,)})
            for i in progress(range(len(paths)), "decoding", unit="image"):
                image = decode(i)
                if image.shape != (*sizes[i], 3):
                    raise DatasetError(f"{paths[i]} decodes to {image.shape[:2]} pixels but its header says "
                                       f"{tuple(sizes[i])}: re-save the file")
                image = np.ascontiguousarray(image, dtype=np.uint8)
                checksums[i] = pixel_checksum(image)
                handle.write(image.tobytes())
        with atomic_write(index_path) as handle:
            np.save(handle, np.column_stack([offsets, sizes, checksums, sources]).astype(np.int64))
    except OSError as error:   # a full disk (OutputError says so), no permission
        warn(f"{error}; the loader decodes the files at every step instead")
        return None
    return read_store(pixels_path, index_path, sources)
