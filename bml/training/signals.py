"""Stopping on a signal: SIGINT/SIGTERM become a request to stop after the current step
(`bml.training.processes.agreed_stop` makes every process leave after the same step)."""

from __future__ import annotations

import os
import signal
import threading

from bml.utils.messages import info


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    The trainer then saves `last.pth` and exits with 128 + the signal number (130 for SIGINT, 143
    for SIGTERM), the shell convention for "stopped by this signal". Repeated signals are ignored:
    torchrun forwards the signal it receives to processes that may already have it from the
    terminal. SIGKILL stops at once, without a checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        self.pid = os.getpid()

    def __enter__(self) -> StopOnSignal:
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():   # Python delivers signals there only
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if os.getpid() == self.pid:   # forked loader workers inherit this handler: they stay quiet
                info(f"\n{signal.Signals(signum).name} received: saving a checkpoint after the current step")

    def requested(self) -> bool:
        return self.signum is not None
