"""The CUDA path's stalls and hangs, exercised on a CPU.

- a steady training step makes no blocking host-device transfer (counted by wrapping every call that would
  wait for a GPU), the status is read at logging steps and the end of the epoch, and a non-finite loss is
  still named by its step and stops the run before anything is saved;
- the trainer's wait for its batches (`data_wait_s`, and its fraction of the step time) in both logs;
- `--compile` says what it compiled, and a fall-back to eager is warned about once and kept in config.json;
- DDP keeps each process's BatchNorm statistics, as the original; the processes leave the group together;
- a failure of any kind in rank 0's validation reaches both Gloo processes at once, and the epoch stays saved.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train_bml
from bml.checkpoint import read_checkpoint
from bml.training.engine import STATUS_EVERY, train_one_epoch
from bml.training.guard import NonFiniteLossError
from bml.training.state import TrainingState
from bml.training.wrappers import wrap_for_training
from bml.utils import distributed
from bml.utils.logger import RunLogger
from test_gpu_path import SETTINGS, tiny_episodes, tiny_parts
from test_training import PYTHON_BIN, TINY, bml_args, epoch_log, one_thread, subprocess_env  # noqa: F401  (autouse)

WAITING_CALLS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
"""Tensor methods that make the host wait for the device when the tensor lives on a GPU."""


@pytest.fixture
def host_waits(monkeypatch) -> list[str]:
    """The calls that would block the host on a GPU, in order: the WAITING_CALLS and torch.tensor(..., device=)
    (a blocking copy from pageable memory)."""
    calls: list[str] = []
    for name in WAITING_CALLS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    tensor = torch.tensor

    def counted_tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            calls.append("tensor(device=)")
        return tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counted_tensor)
    return calls


def epoch_of(parts, batches, state: TrainingState, tmp_path: Path, steps_per_epoch: int, seen=None, pause=0.0):
    """One epoch of `batches` with `steps_per_epoch` announced; `seen(index)` before each batch is handed out."""
    def loader():
        for index, batch in enumerate(batches):
            if seen is not None:
                seen(index)
            time.sleep(pause)
            yield batch

    return train_one_epoch(parts, loader(), state, epoch=1, epochs=4, steps_per_epoch=steps_per_epoch,
                           loss_settings=SETTINGS, stop_requested=lambda: False,
                           logger=RunLogger(tmp_path, enabled=False), print_freq=1000, is_main=False)


@pytest.mark.parametrize("amp, clip_grad", [("off", 1.0), ("bf16", 0.0)])
def test_steady_steps_make_no_host_sync(tmp_path, host_waits, amp, clip_grad):
    """Steps between two status reads queue their work without waiting (no .item(), .tolist(), no tensor built
    on the device from host values); the read at the end of the epoch then takes every step's loss terms."""
    steps = STATUS_EVERY - 2   # no read before the end of the loader (a 1000-step epoch logs every 100 steps)
    parts, state = tiny_parts(amp, clip_grad=clip_grad), TrainingState()
    waits_before_step = []
    epoch_of(parts, tiny_episodes(steps), state, tmp_path, steps_per_epoch=1000,
             seen=lambda index: waits_before_step.append(len(host_waits)))
    per_step = [after - before for before, after in zip(waits_before_step, waits_before_step[1:])]
    assert per_step[1:] == [0] * (steps - 2), host_waits   # the first step may set things up
    assert len(host_waits) > waits_before_step[-1]          # the read after the last step
    assert state.epoch_sums["steps"] == steps and math.isfinite(state.epoch_sums["total"])
    assert ("grad_norm" in state.epoch_sums) == (clip_grad > 0)


def test_a_non_finite_loss_read_later_names_its_step(tmp_path, monkeypatch):
    """The loss of step 3 is NaN; the status is read after step 5: the error names step 3 and its terms."""
    parts, state = tiny_parts(), TrainingState()
    forward, calls = parts.loss_module.forward, []

    def nan_third_call(*args):
        calls.append(1)
        losses = forward(*args)
        return {**losses, "total": losses["total"] * float("nan")} if len(calls) == 3 else losses

    monkeypatch.setattr(parts.loss_module, "forward", nan_third_call)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 1, step 3/1000 \(global step 3\): "
                                                 r".*total=nan"):
        epoch_of(parts, tiny_episodes(5), state, tmp_path, steps_per_epoch=1000)
    assert "steps" not in state.epoch_sums   # nothing of those steps was counted


def test_data_wait_is_measured_around_the_loader(tmp_path):
    """A loader that takes 20 ms a batch: at least that much waiting per step, as a fraction of the steps' time."""
    parts, state = tiny_parts(), TrainingState()
    result = epoch_of(parts, tiny_episodes(3), state, tmp_path, steps_per_epoch=3, pause=0.02)
    assert result.stats["data_wait_s"] >= 3 * 0.02
    assert 0 < result.stats["data_wait_fraction"] <= 1


def test_data_wait_is_logged_per_epoch_and_per_step(tmp_path):
    assert train_bml.main(bml_args(tmp_path, "--epochs", "1", "--episodes_per_epoch", "2", "--eval_freq", "0")) == 0
    steps_log = [json.loads(line) for line in (tmp_path / "log_steps.txt").read_text().splitlines()]
    for entry in epoch_log(tmp_path) + steps_log:
        assert isinstance(entry["data_wait_s"], float) and entry["data_wait_s"] >= 0
        assert 0 <= entry["data_wait_fraction"] <= 1


# ----------------------------------------------------------------------------------------------
# --compile


def compiled_run(tmp_path: Path, monkeypatch, backend) -> dict:
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compile_(module, backend=backend))
    torch._dynamo.reset()
    try:
        assert train_bml.main(bml_args(tmp_path, "--epochs", "1", "--episodes_per_epoch", "3", "--episodes_per_step",
                                       "1", "--eval_freq", "0", "--compile")) == 0
    finally:
        torch._dynamo.reset()
    return json.loads((tmp_path / "config.json").read_text())


def test_compile_reports_its_graphs(tmp_path, monkeypatch, capsys):
    status = compiled_run(tmp_path, monkeypatch, "eager")["compile_status"]
    assert status["graphs"] > 0 and status["fallbacks"] == 0 and status["eager"] is False
    out = capsys.readouterr()
    assert f"torch.compile: {status['graphs']} graph(s), {status['graph_breaks']} graph break(s)" in out.out + out.err
    assert "fell back to eager" not in out.err


def test_compile_that_falls_back_to_eager_warns_once_and_says_so_in_the_config(tmp_path, monkeypatch, capsys):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here (injected)")

    status = compiled_run(tmp_path, monkeypatch, failing_backend)["compile_status"]
    assert status["fallbacks"] > 0 and status["eager"] is True
    assert capsys.readouterr().err.count("--compile fell back to eager") == 1


# ----------------------------------------------------------------------------------------------
# DDP over Gloo


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ddp_keeps_each_process_batchnorm_statistics(one_process_group):
    """As the original: BatchNorm buffers are not broadcast from rank 0 before each forward pass."""
    model = tiny_parts().model
    context = distributed.DistributedContext(0, 0, 2, torch.device("cpu"))
    _, ddp = wrap_for_training(argparse.Namespace(compile=False), model, context)
    assert ddp is not None and ddp.broadcast_buffers is False


def test_processes_leave_the_group_together(one_process_group, monkeypatch):
    calls = []
    for name in ("barrier", "monitored_barrier"):   # Gloo's has a timeout
        monkeypatch.setattr(dist, name, lambda *args, _original=getattr(dist, name), **kwargs:
                            calls.append("barrier") or _original(*args, **kwargs))
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda *args: calls.append("destroy") or destroy(*args))
    distributed.cleanup()
    assert calls == ["barrier", "destroy"] and not dist.is_initialized()


FAILING_VALIDATION = """
import os, sys, train_bml
import bml.training.driver as driver
if os.environ["RANK"] == "0":
    def validate(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")
    driver.validate = validate
sys.exit(train_bml.main(train_bml.get_args_parser().parse_args(sys.argv[1:])))
"""


def test_a_validation_failure_on_rank_0_stops_every_rank_at_once(tmp_path):
    """Any exception in rank 0's validation (here an out-of-memory RuntimeError): both processes exit with its
    message soon (not after the 30-minute collective timeout), and last.pth of the epoch loads."""
    helper = tmp_path / "failing_validation.py"
    helper.write_text(FAILING_VALIDATION)
    folder = tmp_path / "run"
    command = [str(PYTHON_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(helper), *TINY,
               "--epochs", "2", "--episodes_per_epoch", "2", "--episodes_per_step", "2", "--eval_freq", "1",
               "--run_folder", str(folder)]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the processes hung after rank 0's validation failed:\n{output}")
    assert process.returncode != 0, output
    for rank in (0, 1):
        assert f"rank {rank}: validation after epoch 1 failed: RuntimeError: CUDA out of memory (injected)" in output
    checkpoint = read_checkpoint(folder / "last.pth")
    assert checkpoint["epoch"] == 1 and len(checkpoint["rng"]) == 2
    assert [entry["epoch"] for entry in epoch_log(folder)] == [1]
