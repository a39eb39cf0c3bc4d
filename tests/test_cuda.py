"""Tests that need a CUDA GPU (marker `cuda`; skipped elsewhere). `bash bench/gpu_check.sh` runs them with
`pytest -m cuda` on a GPU machine; everything they decide is also tested on the CPU by simulating the device
(tests/test_gpu_path.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train_bml
from bml.checkpoint import read_checkpoint
from bml.utils.device import bf16_native, check_cuda_arch, gpu_info, resolve_amp
from test_training import bml_args, epoch_log, one_thread  # noqa: F401  (one_thread: autouse fixture)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda", 0)


def test_this_build_runs_on_this_gpu_and_bf16_follows_its_capability():
    check_cuda_arch(CUDA)
    gpu = gpu_info(CUDA)
    assert gpu.capability == torch.cuda.get_device_capability(0)
    amp, warnings = resolve_amp("bf16", None, CUDA)
    assert (amp == "bf16") == (gpu.capability >= (8, 0)) == bf16_native(CUDA) and bool(warnings) != (amp == "bf16")


def test_dry_run_allocates_nothing_on_the_gpu(capsys):
    before = torch.cuda.memory_allocated(0)
    assert train_bml.main(train_bml.get_args_parser().parse_args(["--dataset", "miniImageNet", "--dry_run"])) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpu"]["name"] == torch.cuda.get_device_name(0) and plan["amp"] == "off"
    assert torch.cuda.memory_allocated(0) == before


@pytest.mark.parametrize("amp, channels_last", [("off", False), ("off", True), ("fp16", False), ("bf16", True)])
def test_training_on_the_gpu_in_each_precision(tmp_path, amp, channels_last):
    extra = ["--channels_last"] if channels_last else []
    assert train_bml.main(bml_args(tmp_path, "--device", "cuda", "--epochs", "1", "--episodes_per_epoch", "3",
                                   "--episodes_per_step", "2", "--eval_freq", "1", "--amp", amp, *extra)) == 0
    log = epoch_log(tmp_path)[0]
    assert np.isfinite(log["train_total"]) and "val_acc" in log
    config = read_checkpoint(tmp_path / "last.pth")["config"]
    assert config.amp == resolve_amp(amp, None, CUDA)[0] and config.device == "cuda:0"
