"""A fingerprint of a split, to tell whether two copies of a data set hold the same data without reading
every image: the image count, the image shape, a digest of the labels (numbered 0..C-1, in file order) and
a digest of `SAMPLE_IMAGES` evenly spaced images (their pixels for array layouts, their files' bytes for
file layouts). Two copies with equal fingerprints have the same labels in the same order and the same
sampled images; any difference in one of them shows.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from bml.utils.io import hash_file

from .base import FewShotDataset
from .npz import read_npz_rows

SAMPLE_IMAGES = 32
DIGEST_CHARS = 16


def sample_rows(count: int) -> np.ndarray:
    """The fixed sample: `SAMPLE_IMAGES` evenly spaced indices of `count` images, first and last included."""
    return np.unique(np.linspace(0, count - 1, min(count, SAMPLE_IMAGES)).round().astype(np.int64))


def split_fingerprint(labels: np.ndarray, image_shape: Sequence[int] | None, images: np.ndarray | None = None,
                      paths: np.ndarray | None = None,
                      image_members: Sequence[tuple[Path, str]] = ()) -> dict[str, object]:
    """{images, image_shape, labels, pixels, sampled} of a split whose images are in `images`, in the files
    `paths`, or in the .npz members `image_members` (only the sampled rows are read). A layout whose reader
    offers none of these without loading every image gets no pixel digest (`pixels` None, `sampled` 0)."""
    rows = sample_rows(len(labels))
    pixels = hashlib.sha256()
    if paths is not None:
        for path in paths[rows]:
            hash_file(path, pixels)
    elif images is not None or image_members:
        sample = images[rows] if images is not None else read_npz_rows(list(image_members), rows)
        pixels.update(np.ascontiguousarray(sample).tobytes())
    else:
        rows = rows[:0]
    label_bytes = np.ascontiguousarray(labels, dtype="<i8").tobytes()
    return {"images": len(labels), "image_shape": list(image_shape) if image_shape is not None else None,
            "labels": hashlib.sha256(label_bytes).hexdigest()[:DIGEST_CHARS],
            "pixels": pixels.hexdigest()[:DIGEST_CHARS] if len(rows) else None, "sampled": len(rows)}


def dataset_fingerprint(dataset: FewShotDataset) -> dict[str, object]:
    """The fingerprint of an open split (what an evaluation records beside its results)."""
    return split_fingerprint(dataset.labels, dataset.image_shape, getattr(dataset, "images", None),
                             getattr(dataset, "paths", None))
