"""What the processes of a distributed run agree on: a stop requested on any of them, and the outcome of a
check that only the main process runs. Each process then leaves at the same point, with the same message."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from bml.datasets import DatasetError
from bml.training.settings import SettingsError
from bml.training.signals import StopOnSignal
from bml.utils import distributed
from bml.utils.io import OutputError

Result = TypeVar("Result")


def agreed_stop(stop: StopOnSignal, device: torch.device) -> int:
    """The exit code of a stop requested on any process (0: none), the same on every process."""
    signum = torch.tensor([float(stop.signum or 0)], device=device)
    if distributed.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
    code = int(signum.item())   # once an epoch: the only wait for the device here
    return 128 + code if code > 0 else 0


def on_main_process(check: Callable[[], Result]) -> Result:
    """`check()` run on the main process only; every process returns its result, or raises its error.

    Keeps the processes of a distributed run together when a check fails on rank 0 alone."""
    outcome = None
    if distributed.is_main_process():
        try:
            outcome = (True, check())
        except (SettingsError, DatasetError, OutputError) as error:
            outcome = (False, str(error))
    succeeded, value = distributed.all_gather_objects(outcome)[0]
    if not succeeded:
        raise SettingsError(value)
    return value
