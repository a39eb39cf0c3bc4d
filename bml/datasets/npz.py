"""Streaming reader for arrays in .npz files.

`np.load(...)[key]` materialises each member as its own array, so joining tieredImageNet's train and
val images (about 9.5 GB) with `np.concatenate` would need two copies at once. Here the joined array is
allocated once and each member's .npy stream is decompressed straight into its slice.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .errors import DATA_HELP, DatasetError

_CHUNK_BYTES = 1 << 24


def _open_member(archive: zipfile.ZipFile, key: str, path: Path):
    try:
        return archive.open(f"{key}.npy")
    except KeyError:
        keys = [n.removesuffix(".npy") for n in archive.namelist()]
        raise DatasetError(f"{path}: no array '{key}' (found {keys}); {DATA_HELP}") from None


def _read_header(stream, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The member's (shape, fortran_order, dtype), refusing any dtype but plain integers.

    The bytes that follow the header are copied into an array of that dtype, so a dtype that holds
    Python objects (or one with fields) would turn file bytes into pointers: checked before anything
    is allocated.
    """
    try:
        version = npy_format.read_magic(stream)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
    except (ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: array '{key}' has a damaged header ({error}); delete the file and "
                           f"download it again ({DATA_HELP})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "iu":
        raise DatasetError(f"{path}: array '{key}' is stored as {dtype}, but only integer arrays (uint8 images, "
                           f"integer labels) are read; {DATA_HELP}")
    return shape, fortran_order, dtype


def _open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DatasetError(f"expected {path.name} under {path.parent}: {DATA_HELP}") from None
    except zipfile.BadZipFile as error:
        raise DatasetError(f"cannot read {path}: not a valid .npz file ({error}); delete it and download it "
                           f"again ({DATA_HELP})") from None


def npz_array_shape(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one .npz member, from its header alone."""
    path = Path(path)
    with _open_archive(path) as archive, _open_member(archive, key, path) as stream:
        shape, _, dtype = _read_header(stream, path, key)
    return shape, dtype


def read_npz_arrays(members: list[tuple[str | Path, str]], dtype: np.dtype = np.dtype(np.uint8)) -> np.ndarray:
    """Concatenate the arrays `(npz path, key)` along axis 0 into one preallocated array.

    Peak memory is the result plus one 16 MiB chunk. Members must all be `dtype` (uint8 images by
    default) and agree in trailing shape; anything else is refused before allocating.
    """
    headers = [(Path(path), key, *npz_array_shape(path, key)) for path, key in members]
    first_shape = headers[0][2]
    for path, key, shape, member_dtype in headers:
        if member_dtype != dtype:
            raise DatasetError(f"{path}: array '{key}' is stored as {member_dtype}, expected {np.dtype(dtype)}; "
                               f"{DATA_HELP}")
        if shape[1:] != first_shape[1:]:
            raise DatasetError(
                f"{path}: array '{key}' is {member_dtype} {shape}, but {headers[0][0]} holds "
                f"{first_shape}: images of mixed sizes cannot be joined; {DATA_HELP}"
            )
    out = np.empty((sum(h[2][0] for h in headers), *first_shape[1:]), dtype=dtype)
    start = 0
    for path, key, shape, _ in headers:
        target = out[start:start + shape[0]]
        with _open_archive(path) as archive, _open_member(archive, key, path) as stream:
            _, fortran_order, _ = _read_header(stream, path, key)
            if fortran_order:
                raise DatasetError(f"{path}: array '{key}' is stored in Fortran order; re-save it with np.savez")
            _read_exactly(stream, memoryview(target).cast("B"), path)
        start += shape[0]
    return out


def _read_exactly(stream, buffer: memoryview, path: Path) -> None:
    position = 0
    try:
        while position < len(buffer):
            count = stream.readinto(buffer[position:position + _CHUNK_BYTES])
            if not count:
                raise DatasetError(f"{path} is truncated: delete it and download it again ({DATA_HELP})")
            position += count
    except (zipfile.BadZipFile, EOFError, OSError) as error:   # a CRC mismatch or damaged compressed data
        raise DatasetError(f"{path} is damaged ({error}): delete it and download it again ({DATA_HELP})") from None


def _stored_data_offset(path: Path, member: zipfile.ZipInfo) -> int:
    """Where an uncompressed member's bytes start in the .npz file: after its local file header."""
    with open(path, "rb") as handle:
        handle.seek(member.header_offset)
        header = handle.read(30)
    if header[:4] != b"PK\x03\x04":
        raise DatasetError(f"{path}: damaged zip header of {member.filename}; delete it and download it again "
                           f"({DATA_HELP})")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_length + extra_length


def _member_rows(path: Path, key: str, rows: np.ndarray) -> np.ndarray:
    with _open_archive(path) as archive, _open_member(archive, key, path) as stream:
        shape, fortran_order, dtype = _read_header(stream, path, key)
        if fortran_order:
            raise DatasetError(f"{path}: array '{key}' is stored in Fortran order; re-save it with np.savez")
        header_bytes = stream.tell()
        member = archive.getinfo(f"{key}.npy")
        if member.compress_type == zipfile.ZIP_STORED:
            mapped = np.memmap(path, dtype=dtype, mode="r", shape=shape,
                               offset=_stored_data_offset(path, member) + header_bytes)
            return np.array(mapped[rows])
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        row_bytes = out[0].nbytes if len(rows) else 0
        for target, row in zip(out, rows.tolist()):
            stream.seek(header_bytes + row * row_bytes)   # forward only: rows are sorted
            _read_exactly(stream, memoryview(target).cast("B"), path)
        return out


def read_npz_rows(members: list[tuple[str | Path, str]], rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted, unique) of the arrays `(npz path, key)` joined along axis 0, reading no other row
    of an uncompressed member (memory-mapped); a compressed one is decompressed, streamed, up to its last row."""
    out, start = [], 0
    for path, key in members:
        path = Path(path)
        count = npz_array_shape(path, key)[0][0]
        local = rows[(rows >= start) & (rows < start + count)] - start
        if len(local):
            out.append(_member_rows(path, key, local))
        start += count
    return np.concatenate(out)
