"""Image files: read as RGB, checked when a data set is opened, their sizes from the headers, and the folder
where data built from them is kept. Below the dataset containers (`base`) and the decoded-image store
(`decoded`), which both use them."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from bml.utils.io import not_regular_file

from .errors import DatasetError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""PIL modes of 16-bit images (mode "I" too: older Pillow versions open 16-bit PNGs so)."""
COMPLETE_FILE_ENDINGS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}
"""How a complete file of these formats ends; a file that ends otherwise is decoded in full to find out."""
BAD_IMAGES_LISTED = 10
SIDEWAYS_ORIENTATIONS = {5, 6, 7, 8}
"""EXIF orientations whose upright image is the stored one turned a quarter: its height is the stored width."""


def cache_dir() -> Path:
    """Where built data is kept (the glyphs set, decoded images): $BML_CACHE_DIR, default ~/.cache/bml."""
    return Path(os.environ.get("BML_CACHE_DIR") or Path.home() / ".cache" / "bml")


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation 1..8 (1: stored upright, also for a missing or invalid tag; phone photos are
    often stored sideways, with the tag saying how to turn them)."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def image_to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image, turned upright as its EXIF orientation says; 16-bit (0..65535) and float (0..1) images are
    scaled to 8 bits with their range preserved (PIL's own conversion clips them), float images outside 0..1 are
    refused."""
    if orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
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
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    if problem := not_regular_file(path):   # opening a FIFO would wait for a writer forever
        return problem
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
    """(N, 2) array of the upright (height, width), read from the file headers only (no pixel decoding)."""
    sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            sizes[i] = (image.width, image.height) if orientation(image) in SIDEWAYS_ORIENTATIONS else \
                (image.height, image.width)
    return sizes


def common_image_shape(paths: np.ndarray) -> tuple[int, int, int] | None:
    """(H, W, 3) when every image has the same size, else None."""
    sizes = read_image_sizes(paths)
    if len(sizes) == 0 or (sizes != sizes[0]).any():
        return None
    return int(sizes[0, 0]), int(sizes[0, 1]), 3
