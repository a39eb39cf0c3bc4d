"""Process-group set-up and helpers that also work as one plain process.

Under `torchrun` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK) each process joins
one group: NCCL when it trains on a GPU, Gloo on CPUs. Without those variables nothing is
initialised and every helper answers as rank 0 of a world of one, so the same training code runs
unchanged on a laptop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bml.utils.messages import INFO, emit

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
"""Long enough for the other processes to wait while rank 0 validates on a large split."""
LEAVE_TIMEOUT = timedelta(minutes=1)
"""How long a process that is done waits for the others before it leaves the process group."""
FIRST_CONTACT_TIMEOUT = timedelta(minutes=2)
"""How long the processes of a run started without a launcher (RANK and WORLD_SIZE set by hand) wait for each
other before saying who is missing; torchrun starts them all itself."""
TRAINING_DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its rank, the number of processes and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if is_dist_avail_and_initialized():
        dist.barrier()


class DeviceError(ValueError):
    """A requested device that this machine (or this torch build) cannot train on."""


def resolve_device(requested: str | None, local_rank: int = 0, select: bool = True) -> torch.device:
    """The training device: `requested` if given ('cpu', 'cuda', 'cuda:1', ...), else a GPU if any.

    Under torchrun a bare 'cuda' means this process's own GPU, `cuda:<LOCAL_RANK>`. `select=False`
    only names the device (for a dry run) without making it current.
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"--device {requested!r} is not a device: use cpu, cuda or cuda:<index> (or leave --device "
                          "out to pick one automatically)") from None
    if device.type not in TRAINING_DEVICE_TYPES:
        raise DeviceError(f"--device {requested}: this project runs on {' or '.join(TRAINING_DEVICE_TYPES)} only; use "
                          "--device cpu or cuda (or leave --device out to pick one automatically)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested} was asked for but no CUDA GPU is visible; "
                               "use --device cpu (or leave --device out to pick one automatically)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if select:
            torch.cuda.set_device(device)
    return device


def init_distributed_mode(device: str | None = None) -> DistributedContext:
    """Join the process group that torchrun describes in the environment, or stay single-process.

    The backend follows the device: NCCL for GPUs, Gloo for CPUs.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistributedContext(rank=0, local_rank=0, world_size=1, device=resolve_device(device))
    rank, world_size, local_rank = launcher_ranks()
    context = DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size,
                                 device=resolve_device(device, local_rank))
    if world_size > 1 and not is_dist_avail_and_initialized():
        backend = "nccl" if context.device.type == "cuda" else "gloo"
        store = None if "TORCHELASTIC_RUN_ID" in os.environ else first_contact(rank, world_size)
        dist.init_process_group(backend=backend, init_method=None if store else "env://", store=store,
                                world_size=world_size, rank=rank, timeout=COLLECTIVE_TIMEOUT,
                                device_id=context.device if backend == "nccl" else None)
        dist.barrier()
    return context


def launcher_ranks() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment, checked: a DeviceError names a malformed one."""
    def variable(name: str, default: str | None = None) -> int:
        text = os.environ.get(name, default)
        try:
            return int(text)
        except ValueError:
            raise DeviceError(f"{name}={text!r} in the environment is not an integer: start the run with torchrun "
                              "(or bash train_bml.sh), or unset RANK and WORLD_SIZE to run in one process") from None

    rank, world_size, local_rank = variable("RANK"), variable("WORLD_SIZE"), variable("LOCAL_RANK", "0")
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DeviceError(f"RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank} in the environment do not "
                          "describe a process of a run (0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0): start the run with "
                          "torchrun (or bash train_bml.sh), or unset RANK and WORLD_SIZE to run in one process")
    return rank, world_size, local_rank


def first_contact(rank: int, world_size: int) -> dist.Store:
    """The store of a run whose processes were started by hand (no launcher), once every process has reached it;
    a DeviceError saying who is missing after FIRST_CONTACT_TIMEOUT, not a silent wait of COLLECTIVE_TIMEOUT."""
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
    seconds = FIRST_CONTACT_TIMEOUT.total_seconds()
    waited = (f"the other {world_size - 1} process(es) of WORLD_SIZE={world_size}" if rank == 0
              else f"process 0 (RANK=0) at MASTER_ADDR={address} MASTER_PORT={port}")
    emit(INFO, f"rank {rank}: RANK and WORLD_SIZE are set without a launcher: waiting up to {seconds:g} s for "
               f"{waited}", every_rank=True)
    try:
        return dist.TCPStore(address, int(port), world_size, is_master=rank == 0, timeout=FIRST_CONTACT_TIMEOUT,
                             wait_for_workers=True)
    except (RuntimeError, ValueError, OSError) as problem:   # torch's DistStoreError is a RuntimeError
        raise DeviceError(f"rank {rank}: {waited} did not join within {seconds:g} s ({type(problem).__name__}): "
                          f"start all {world_size} processes (torchrun --nproc_per_node={world_size} ..., or bash "
                          "train_bml.sh), or unset RANK and WORLD_SIZE to run in one process") from None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (the tensor itself in a single process)."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list:
    """One picklable object from every process, in rank order."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    """Leave the process group together (a barrier first) so the launcher sees a clean exit.

    The barrier waits LEAVE_TIMEOUT at most: a process that leaves alone (an error the others did not see)
    still exits, and the launcher stops the rest."""
    if is_dist_avail_and_initialized():
        try:   # Gloo's plain barrier would wait for the group's 30-minute timeout
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
            else:
                dist.barrier(async_op=True).wait(LEAVE_TIMEOUT)
        except RuntimeError:   # timed out, or another process already gone: leave anyway
            pass
        dist.destroy_process_group()
