"""File writes the project cares about: atomic replacement, writable outputs checked before long work,
and a full disk reported in those words; and files hashed in chunks (`hash_file`)."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import filelock

TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))
"""How `atomic_write` names its temporary file: `.<target>.<8 random characters>.tmp` (mkstemp's)."""
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FILE_TOO_LARGE_ERRNOS = (errno.EFBIG,)
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)

_HASH_CHUNK_BYTES = 1 << 20


def hash_file(path: str | os.PathLike, digest: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    """`digest` (a new sha256 by default) updated with the bytes of `path`, read in 1 MiB chunks: a checkpoint
    or an image is hashed without being held in memory twice."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest


class OutputError(OSError):
    """An output that cannot be written (full disk, no permission, a file where a folder belongs, a
    folder another process writes to); the message names the path and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_error(path: Path, needed: int | None = None) -> OutputError:
    """The message for a write to `path` that ran out of space."""
    path = Path(path)
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
        if error.errno in FILE_TOO_LARGE_ERRNOS:
            raise file_too_large_error(Path(path)) from error
        raise


def file_too_large_error(path: Path) -> OutputError:
    """The message for a write to `path` beyond the file-size limit of this process (`ulimit -f`)."""
    return OutputError(errno.EFBIG, f"file too large: writing {path} went past this process's file-size limit "
                                    "(ulimit -f): raise the limit or write to another file system, then run again")


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", rename: bool = True) -> Iterator[IO]:
    """Yield a handle on a temporary file beside ``path``; on success fsync it and rename it over
    ``path``, on any error remove it. A crash mid-write never leaves a truncated ``path``; a full
    disk raises OutputError (the previous ``path`` stays as it was). The file gets the mode of any
    other new file (mkstemp's would be 0o600). A link at ``path`` is replaced, never written through.
    ``rename=False`` leaves the complete temporary file (``handle.temporary``) for the caller to rename
    (`atomic_write_together`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with explain_disk_full(path), os.fdopen(descriptor, mode) as handle:
            handle.temporary = temporary
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, default_file_mode())
        if rename:
            os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def remove_orphan_temporaries(folder: str | os.PathLike, targets: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files `atomic_write` leaves when a process is killed mid-write of a file matching one of
    the glob patterns `targets`; returns them. Other hidden files (a user's own `.notes.tmp`) are left alone.

    Only for a folder that no other process is writing to (a run folder whose lock is held)."""
    orphans = []
    for path in sorted(Path(folder).glob(f".*{TEMPORARY_SUFFIX}")):
        name = TEMPORARY_NAME.fullmatch(path.name)
        if name and any(fnmatch.fnmatchcase(name["target"], target) for target in targets) \
                and stat.S_ISREG(path.lstat().st_mode):
            path.unlink(missing_ok=True)
            orphans.append(path)
    return orphans


def not_regular_file(path: str | os.PathLike) -> str | None:
    """Why an existing `path` is not a regular file (a FIFO, socket or device: opening one may block forever),
    or None: a regular file (or a link to one), or nothing there."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{path} is {kind}, not a regular file"


def open_no_follow(path: str | os.PathLike, flags: int, mode: str) -> IO:
    """`open` for a file the project writes in a folder it owns (a run folder), never through a link: a link
    where the file should be is an OutputError (it could point at any file of the user's)."""
    if not NO_FOLLOW and Path(path).is_symlink():   # no O_NOFOLLOW (Windows): look first
        raise link_error(Path(path))
    try:
        descriptor = os.open(path, flags | NO_FOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise link_error(Path(path)) from None
        raise
    return os.fdopen(descriptor, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def link_error(path: Path) -> OutputError:
    return OutputError(errno.ELOOP, f"{path} is a link: files of a run are never written through links the run did "
                                    "not make; remove the link (or choose another --save_folder)")


def append_file(path: str | os.PathLike) -> IO:
    """A text file opened to append to, created if needed, never through a link."""
    return open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a")


def check_outputs_are_not_inputs(outputs: dict[str, str | os.PathLike | None],
                                 inputs: dict[str, list[str | os.PathLike]]) -> None:
    """Refuse, before any work, an output path that is an input of the same command (or another output): it would
    replace the checkpoint, an image or a result. `outputs` is {flag: path}, `inputs` {flag: paths}."""
    def same(first: Path, second: Path) -> bool:
        if first.resolve() == second.resolve():
            return True
        with contextlib.suppress(OSError):
            return os.path.samefile(first, second)   # a hard link
        return False

    seen: list[tuple[str, Path]] = []
    for flag, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        for other_flag, other in seen:
            if same(path, other):
                raise OutputError(errno.EEXIST, f"{flag} {path} is also {other_flag}: give each output its own path")
        for input_flag, paths in inputs.items():
            for candidate in paths:
                if same(path, Path(candidate)):
                    what = "" if str(candidate) == str(inputs[input_flag][0]) and len(paths) == 1 else \
                        f" ({candidate})"
                    raise OutputError(errno.EEXIST, f"{flag} {path} is an input of this command, {input_flag}"
                                                    f"{what}: writing it would replace it; choose another path")
        seen.append((flag, path))


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
    """Check that `path` can be written (its folder writable, not a folder itself, nor a FIFO or device that writing
    would block on), before any long work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(errno.EISDIR, f"{flag} {path} is a folder: give a file name")
    if problem := not_regular_file(path):
        raise OutputError(errno.EINVAL, f"{flag}: {problem}: give the path of a file")
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
    crashed or killed holder never leaves it stuck. A link where the lock or its holder file should be is an
    OutputError (opening it would truncate the link's target)."""
    folder = Path(folder)
    for name in (LOCK_FILE, HOLDER_FILE):
        if (folder / name).is_symlink():
            raise link_error(folder / name)
    lock = filelock.FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = folder / HOLDER_FILE
        pid = (holder.read_text().strip() if holder.is_file() else "") or "unknown"
        raise OutputError(errno.EBUSY, f"another run (process {pid}) is writing to {folder}: wait for it to "
                                       "finish, or choose another --save_folder") from None
    try:
        with open_no_follow(folder / HOLDER_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "w") as holder:
            holder.write(f"{os.getpid()}\n")
        yield
    finally:
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


RESULTS_LOCK_FILE = ".results.lock"


def atomic_write_together(contents: dict[Path, str]) -> None:
    """Write text files as one unit: every file is written to its temporary file first, then all are renamed under
    a lock (`RESULTS_LOCK_FILE` in the first file's folder, waited for), so that concurrent writers never leave one
    file of each. A full disk raises OutputError and changes none of them."""
    with contextlib.ExitStack() as stack:
        renames = []
        for path, text in contents.items():
            path = Path(path)
            handle = stack.enter_context(atomic_write(path, "w", rename=False))
            handle.write(text)
            renames.append((handle, path))
        stack.close()   # every temporary file complete and fsynced, or an error before any rename
    try:
        with filelock.FileLock(Path(next(iter(contents))).parent / RESULTS_LOCK_FILE):
            for handle, path in renames:
                os.replace(handle.temporary, path)
    finally:
        for handle, _ in renames:
            Path(handle.temporary).unlink(missing_ok=True)
