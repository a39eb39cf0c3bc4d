"""Loader workers leave stopping to the main process."""

from __future__ import annotations

import signal


def leave_stopping_to_the_main_process(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: the worker ignores SIGINT and SIGTERM.

    A scheduler stopping a job (SLURM's scancel, `kill -- -PGID`) signals every process of it. PyTorch's
    workers die on a SIGTERM not sent by their parent, and the main process then fails on the lost worker
    before it can save its checkpoint. Ignoring the signal, a worker keeps serving batches until the main
    process, which stops after the current step, shuts the loader down; a worker whose main process is gone
    still exits on its own (PyTorch's watchdog).
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
