"""File writes the project cares about: atomic replacement, writable outputs checked before long work,
and a full disk reported in those words."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import filelock

TEMPORARY_SUFFIX = ".tmp"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class OutputError(OSError):
    """An output that cannot be written (full disk, no permission, a file where a folder belongs, a
    folder another process writes to); the message names the path and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_error(path: Path, needed: int | None = None) -> OutputError:
    """The message for a write to `path` that ran out of space."""
    folder = path.parent
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    size = f"needs about {needed:,} bytes" if needed else "could not be completed"
    return OutputError(errno.ENOSPC, f"no space left on device: writing {path.name} in {folder} {size} ({free} "
                                     f"there); free some space or choose another folder, then run again")


@contextlib.contextmanager
def explain_disk_full(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn an out-of-space OSError raised while writing `path` into an OutputError that says so."""
    try:
        yield
    except OutputError:
        raise
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(Path(path), needed) from error
        raise


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a handle on a temporary file beside ``path``; on success fsync it and rename it over
    ``path``, on any error remove it. A crash mid-write never leaves a truncated ``path``; a full
    disk raises OutputError (the previous ``path`` stays as it was). The file gets the mode of any
    other new file (mkstemp's would be 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with explain_disk_full(path), os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_write` leaves when a process is killed mid-write; returns them.

    Only for a folder that no other process is writing to (a run folder whose lock is held)."""
    orphans = sorted(Path(folder).glob(f".*{TEMPORARY_SUFFIX}"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def check_output_folder(folder: str | os.PathLike, flag: str) -> Path:
    """Create `folder` if needed and check that files can be written in it, before any long work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(errno.ENOTDIR, f"{flag} {folder} is a file, not a folder: choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(error.errno, f"cannot write in {flag} {folder} ({error.strerror or error}): "
                                       "choose another folder or fix its permissions") from None
    return folder


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Check that `path` can be written (its folder writable, not a folder itself), before any long work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(errno.EISDIR, f"{flag} {path} is a folder: give a file name")
    check_output_folder(path.parent, f"the folder of {flag}")
    return path


LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.pid"
"""The process id of the lock's holder, for the message a second run gets (a locked file may not be
readable on Windows, so it is kept beside the lock)."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while the block runs; OutputError at once if another process
    holds it. The lock is the operating system's (`filelock`: flock on Unix, LockFileEx on Windows), so a
    crashed or killed holder never leaves it stuck."""
    folder = Path(folder)
    lock = filelock.FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = folder / HOLDER_FILE
        pid = (holder.read_text().strip() if holder.is_file() else "") or "unknown"
        raise OutputError(errno.EBUSY, f"another run (process {pid}) is writing to {folder}: wait for it to "
                                       "finish, or choose another --save_folder") from None
    try:
        (folder / HOLDER_FILE).write_text(f"{os.getpid()}\n")
        yield
    finally:
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()
