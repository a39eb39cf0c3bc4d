"""What the user is told: one place for the project's messages.

Library code never calls `print` for the user; it calls `info`, `warn` or `error` here. Messages go
to the terminal from the main process only (rank 0 of a distributed run: the other processes would
repeat every line), info to stdout, warnings and errors to stderr, and also to a log file once
`log_to(path)` is set (training sets its run folder's `messages.txt`), so that what a batch job
printed is kept beside the run. Command-line front ends that print their own results (a JSON plan, a
results table) still write those to stdout themselves: they are the command's output, not messages.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

INFO, PROGRESS, WARNING, ERROR = "info", "progress", "warning", "error"
_PREFIXES = {INFO: "", PROGRESS: "", WARNING: "WARNING: ", ERROR: "ERROR: "}
_log_file: TextIO | None = None


def _is_main_process() -> bool:
    """Rank 0, or a single process; torch's process group asked directly (imported lazily), so that this module
    stays at the bottom layer, below `bml.utils.distributed`, which tells through it what a rendezvous waits for."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log_to(path: str | Path | None) -> None:
    """Also append every message (with a time stamp) to `path`; None stops it. Main process only."""
    global _log_file
    if _log_file is not None:
        _log_file.close()
        _log_file = None
    if path is not None and _is_main_process():
        from bml.utils.io import append_file   # lazily: this module stays at the bottom layer

        _log_file = append_file(path)


def emit(level: str, message: str, every_rank: bool = False) -> None:
    """Show `message` at `level` (`INFO`, `PROGRESS`, `WARNING`, `ERROR`); `every_rank` also on processes other
    than rank 0 (an error that only that process saw). Progress goes to stderr, as progress bars do, so that a
    command's own output on stdout stays clean."""
    if not every_rank and not _is_main_process():
        return
    text = _PREFIXES[level] + message
    stream = sys.stdout if level == INFO else sys.stderr
    print(text, file=stream, flush=True)
    if _log_file is not None:
        try:
            _log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            _log_file.flush()
        except OSError:   # a full disk must not turn a message into a crash; the terminal still has it
            pass


def info(message: str) -> None:
    emit(INFO, message)


def progress_line(message: str) -> None:
    """A line of progress off a terminal (`bml.utils.progress`)."""
    emit(PROGRESS, message)


def warn(message: str) -> None:
    emit(WARNING, message)


def error(message: str, every_rank: bool = False) -> None:
    emit(ERROR, message, every_rank)
