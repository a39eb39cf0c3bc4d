"""Progress of work that takes more than a moment, shown the one way that suits where the output goes.

On a terminal: a tqdm bar on stderr. Elsewhere (nohup, a batch job's log, a pipe), a bar would be one
endless line of carriage returns, so a line per tenth of the work goes to stderr through
`bml.utils.messages.progress_line` instead (rank 0 only, also into the run's messages.txt). Use it for any
loop a user may wait on:

    for batch in progress(loader, "validation: embedding", total=len(loader), unit="batch"):
        ...
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

from bml.utils.messages import progress_line

Item = TypeVar("Item")
LINES_PER_TASK = 10
"""Off a terminal: one line per this fraction of the work (a tenth)."""


def on_terminal() -> bool:
    """Whether progress bars can be drawn: stderr is a terminal."""
    return sys.stderr.isatty()


class TenthLines:
    """The off-terminal progress: a line at each tenth of `total` (tqdm's update/close/context API)."""

    def __init__(self, total: int, what: str, unit: str = "") -> None:
        self.total, self.what, self.unit = max(int(total), 0), what, unit
        self.done, self.tenths = 0, 0

    def update(self, count: int = 1) -> None:
        self.done += count
        tenths = LINES_PER_TASK * self.done // self.total if self.total else LINES_PER_TASK
        if tenths > self.tenths:
            self.tenths = min(tenths, LINES_PER_TASK)
            percent = 100 * self.tenths // LINES_PER_TASK
            progress_line(f"{self.what}: {percent}% ({min(self.done, self.total)}/{self.total})")

    def close(self) -> None:
        pass

    def __enter__(self) -> TenthLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, what: str, unit: str = "", enabled: bool = True) -> tqdm | TenthLines:
    """A counter to `update` as the work advances: a bar on a terminal, a line per tenth elsewhere; silent when
    not `enabled` (a disabled tqdm)."""
    if enabled and not on_terminal():
        return TenthLines(total, what, unit)
    return tqdm(total=total, desc=what, unit=unit or "it", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def progress(items: Iterable[Item], what: str, total: int | None = None, unit: str = "",
             enabled: bool = True) -> Iterator[Item]:
    """`items`, reporting progress as `progress_bar` does (`total`: default len(items))."""
    total = len(items) if total is None else total
    with progress_bar(total, what, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
