"""Streaming reader for arrays in .npz files.

`np.load(...)[key]` materialises each member as its own array, so joining tieredImageNet's train and
val images (about 9.5 GB) with `np.concatenate` would need two copies at once. Here the joined array is
allocated once and each member's .npy stream is decompressed straight into its slice.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .base import DATA_HELP, DatasetError

_CHUNK_BYTES = 1 << 24


def _open_member(archive: zipfile.ZipFile, key: str, path: Path):
    try:
        return archive.open(f"{key}.npy")
    except KeyError:
        keys = [n.removesuffix(".npy") for n in archive.namelist()]
        raise DatasetError(f"{path}: no array '{key}' (found {keys}); {DATA_HELP}") from None


def _read_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(stream)
    read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    return read(stream)


def _open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DatasetError(f"expected {path.name} under {path.parent}: {DATA_HELP}") from None
    except zipfile.BadZipFile as error:
        raise DatasetError(f"cannot read {path}: not a valid .npz file ({error}); {DATA_HELP}") from None


def npz_array_shape(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one .npz member, from its header alone."""
    path = Path(path)
    with _open_archive(path) as archive, _open_member(archive, key, path) as stream:
        shape, _, dtype = _read_header(stream)
    return shape, dtype


def read_npz_arrays(members: list[tuple[str | Path, str]]) -> np.ndarray:
    """Concatenate the arrays `(npz path, key)` along axis 0 into one preallocated array.

    Peak memory is the result plus one 16 MiB chunk. Members must agree in dtype and trailing shape.
    """
    headers = [(Path(path), key, *npz_array_shape(path, key)) for path, key in members]
    _, _, first_shape, dtype = headers[0]
    for path, key, shape, member_dtype in headers:
        if member_dtype != dtype or shape[1:] != first_shape[1:]:
            raise DatasetError(
                f"{path}: array '{key}' is {member_dtype} {shape}, but {headers[0][0]} holds "
                f"{dtype} {first_shape}: images of mixed sizes cannot be joined; {DATA_HELP}"
            )
    out = np.empty((sum(h[2][0] for h in headers), *first_shape[1:]), dtype=dtype)
    start = 0
    for path, key, shape, _ in headers:
        target = out[start:start + shape[0]]
        with _open_archive(path) as archive, _open_member(archive, key, path) as stream:
            _, fortran_order, _ = _read_header(stream)
            if fortran_order:
                raise DatasetError(f"{path}: array '{key}' is stored in Fortran order; re-save it with np.savez")
            _read_exactly(stream, memoryview(target).cast("B"), path)
        start += shape[0]
    return out


def _read_exactly(stream, buffer: memoryview, path: Path) -> None:
    position = 0
    while position < len(buffer):
        count = stream.readinto(buffer[position:position + _CHUNK_BYTES])
        if not count:
            raise DatasetError(f"{path} is truncated: re-download it ({DATA_HELP})")
        position += count
