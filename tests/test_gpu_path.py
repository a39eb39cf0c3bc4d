"""The GPU path, exercised on a CPU.

- precision, TF32 and torch-build decisions on simulated GPUs (compute capability 7.0, 8.0, 9.0, a build
  without the device's arch), by monkeypatching the torch.cuda queries they read;
- the dry-run plan of both entry scripts, the launcher and both shell scripts (processes = the recipe's
  episodes per step, at most), without reading images or touching a GPU;
- fp16 autocast with torch.amp.GradScaler("cpu") (overflow-skipped steps, clipping after unscale_, resume
  with the scaler's state), channels_last, torch.compile without recompilation between epochs, and DDP
  over Gloo: 2 episodes split over 2 processes give the gradients of 1 process doing both.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_baseline
import train_bml
from bml import launch
from bml.datasets import episode_labels
from bml.training.engine import forward_backward, train_one_epoch
from bml.training.state import TrainComponents, TrainingState
from bml.training.step_plan import step_plan
from bml.models import BML
from bml.checkpoint import read_checkpoint
from bml.recipes import BML_LOSSES
from bml.training import SettingsError, apply_recipe, resolve_episodes
from bml.training.wrappers import build_optimizer, wrap_for_training
from bml.utils.device import build_runs_on, check_cuda_arch, configure_tf32, resolve_amp, tf32_active
from bml.utils.distributed import DeviceError, DistributedContext
from bml.utils.logger import RunLogger
from fixtures import make_tiered
from test_training import ROOT, TINY, bml_args, epoch_log, one_thread  # noqa: F401  (autouse)

PUBLISHED = ("miniImageNet", "tieredImageNet", "CIFAR-FS", "FC100", "CUB")
CUDA = torch.device("cuda", 0)
WAY, SHOT, QUERY, SIZE = 5, 2, 3, 32
SETTINGS = {"way": WAY, "shot": SHOT, "query": QUERY, "epoch": torch.tensor(1.0, dtype=torch.float64),
            "max_epoch": 4, **BML_LOSSES.model_settings()}


# ----------------------------------------------------------------------------------------------
# Decisions from the device's properties


@pytest.mark.parametrize("capability, requested, opt_level, expected, warns", [
    ((7, 0), None, None, "off", False),      # fp32 is the default everywhere
    ((9, 0), None, None, "off", False),
    ((7, 0), "bf16", None, "fp16", True),    # V100: no native bf16 -> fp16 with the scaler, one warning
    ((8, 0), "bf16", None, "bf16", False),
    ((9, 0), "bf16", None, "bf16", False),
    ((7, 0), "fp16", None, "fp16", False),
    ((8, 0), None, "O0", "off", False),
    ((8, 0), None, "O1", "fp16", False),
    ((8, 0), None, "O2", "fp16", True),      # Apex's fp16 weights are not autocast: said so
    ((8, 0), "bf16", "O1", "bf16", False),   # --amp wins over --amp_opt_level
])
def test_precision_follows_compute_capability(simulate_gpu, capability, requested, opt_level, expected, warns):
    simulate_gpu(capability)
    amp, warnings = resolve_amp(requested, opt_level, CUDA)
    assert amp == expected and bool(warnings) == warns
    if requested == "bf16" and warns:
        assert "compute capability 7.0" in warnings[0] and "fp16" in warnings[0]


def test_tf32_applies_from_ampere_on_unless_turned_off(simulate_gpu):
    assert not tf32_active("on", torch.device("cpu"))
    for capability, active in (((7, 0), False), ((8, 0), True), ((9, 0), True)):
        simulate_gpu(capability)
        assert tf32_active("on", CUDA) == active and not tf32_active("off", CUDA)


@pytest.fixture
def restore_tf32():
    """The process-wide TF32 settings as they were before the test: the boolean flags, then each fp32_precision."""
    precisions = [torch.backends.cudnn, torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul]
    saved = [backend.fp32_precision for backend in precisions]
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
    for backend, precision in zip(precisions, saved):
        backend.fp32_precision = precision


@pytest.mark.parametrize("mode", ["off", "on", "off"])
def test_tf32_settings_read_cleanly_after_each_mode(restore_tf32, mode):
    """configure_tf32 sets cuDNN (convolutions and RNNs) and matrix products consistently: the legacy flags that
    torch.compile and other libraries read answer instead of raising (setting only the convolutions' fp32_precision
    made torch.backends.cudnn.allow_tf32 raise RuntimeError)."""
    configure_tf32(mode)
    assert torch.backends.cudnn.allow_tf32 == (mode == "on")
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
    convolutions = {torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision}
    assert convolutions == ({"tf32"} if mode == "on" else {"none"})
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_torch_build_without_the_gpus_arch_stops_before_training(simulate_gpu, tmp_path, capsys):
    assert build_runs_on((8, 6), ["sm_80"])                   # same major, newer minor: the cubin runs
    assert build_runs_on((12, 0), ["sm_90", "compute_90"])    # PTX is compiled for newer GPUs
    assert not build_runs_on((7, 0), ["sm_75", "sm_80"])
    assert not build_runs_on((12, 0), ["sm_80", "sm_90"])
    selected = simulate_gpu((12, 0), arch_list=("sm_50", "sm_60", "sm_70", "sm_80", "sm_90"), name="NVIDIA B200")
    with pytest.raises(DeviceError) as error:
        check_cuda_arch(CUDA)
    for part in ("NVIDIA B200", "compute capability 12.0", "sm_120", "sm_50, sm_60, sm_70, sm_80, sm_90",
                 "pytorch.org"):
        assert part in str(error.value)
    # the dry run and the run itself stop with that message before reading any data (the data root does not exist)
    missing_data = ["--dataset", "miniImageNet", "--data_root", str(tmp_path / "nowhere")]
    assert train_bml.main(train_bml.get_args_parser().parse_args([*missing_data, "--dry_run"])) == 1
    assert not selected and "no kernels for the GPU NVIDIA B200" in capsys.readouterr().err
    assert train_bml.main(train_bml.get_args_parser().parse_args(missing_data)) == 1
    message = capsys.readouterr().err
    assert "no kernels for the GPU NVIDIA B200" in message and "data root" not in message


# ----------------------------------------------------------------------------------------------
# The plan: episodes per step, processes, dry runs


def dry_run_plan(capsys, script: str, *argv: str) -> tuple[dict, str]:
    """The JSON plan that `python -m bml.launch SCRIPT ARGV --dry_run` prints, and its stderr."""
    assert launch.main([str(ROOT / script), *argv, "--dry_run"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


@pytest.mark.parametrize("dataset", PUBLISHED)
def test_dry_run_prints_the_published_plan(dataset, capsys, tmp_path):
    plan, _ = dry_run_plan(capsys, "train_bml.py", "--dataset", dataset, "--data_root", str(tmp_path / "nowhere"))
    tiered = dataset == "tieredImageNet"
    assert (plan["device"], plan["gpu"], plan["world_size"]) == ("cpu", None, 1)
    assert (plan["episodes_per_step"], plan["episodes_per_process"], plan["amp"], plan["validation_amp"]) \
        == (2, 2, "off", "off")
    assert (plan["epochs"], plan["steps_per_epoch"], plan["image_size"]) == (200 if tiered else 100, 500, 84)
    assert plan["lr_schedule"] == ([[1, 0.1], [41, 0.01], [81, 0.001], [121, 0.0001], [161, 1e-05]] if tiered
                                   else [[1, 0.1], [51, 0.006], [71, 0.0012]])
    assert plan["val_split"] == (None if tiered else "val")   # tieredImageNet trains on val: nothing chosen there
    assert plan["transform"] == {"miniImageNet": "A", "tieredImageNet": "B", "FC100": "C", "CIFAR-FS": "D",
                                 "CUB": "E"}[dataset]
    assert plan["save_folder"].startswith(f"output/{dataset}_bml_Res12_w1_84px_15w5s7q")
    assert plan["launch"].endswith(f"train_bml.py --dataset {dataset} --data_root {tmp_path / 'nowhere'}")
    assert not (tmp_path / "nowhere").exists() and not Path(plan["save_folder"]).exists()


def test_launcher_starts_at_most_the_recipes_episodes_per_step(simulate_gpu, capsys):
    selected = simulate_gpu((8, 0), count=8, name="NVIDIA A100")
    plan, _ = dry_run_plan(capsys, "train_bml.py", "--dataset", "miniImageNet")
    assert (plan["world_size"], plan["episodes_per_step"], plan["episodes_per_process"]) == (2, 2, 1)
    assert plan["gpu"] == {"name": "NVIDIA A100", "capability": "8.0"} and plan["tf32"] is True
    assert "--nproc_per_node=2" in plan["launch"] and plan["warnings"] == []
    plan, _ = dry_run_plan(capsys, "train_baseline.py", "--dataset", "CUB", "--mode", "global", "--amp", "bf16")
    assert (plan["world_size"], plan["episodes_per_process"], plan["amp"], plan["steps_per_epoch"]) == (2, 1, "bf16",
                                                                                                         None)
    assert "128" in plan["steps_per_epoch_rule"]
    plan, err = dry_run_plan(capsys, "train_bml.py", "--dataset", "miniImageNet", "--allow_more_processes")
    assert (plan["world_size"], plan["episodes_per_step"], plan["episodes_per_process"]) == (8, 8, 1)
    assert "--nproc_per_node=8" in plan["launch"] and "not the published recipe" in plan["warnings"][0]
    assert err.count("WARNING") == 1 and "not the published recipe" in err
    plan, _ = dry_run_plan(capsys, "train_bml.py", "--dataset", "glyphs")   # the CPU-sized recipe: 1 episode
    assert (plan["world_size"], plan["episodes_per_step"]) == (1, 1) and "nproc" not in plan["launch"]
    assert not selected
    simulate_gpu((7, 0), count=2, name="Tesla V100-SXM2-16GB")
    plan, err = dry_run_plan(capsys, "train_bml.py", "--dataset", "CUB", "--amp", "bf16")
    assert plan["amp"] == "fp16" and "Tesla V100-SXM2-16GB" in plan["warnings"][0]
    assert err.count("WARNING") == 1 and "WARNING: Tesla V100-SXM2-16GB" in err


def test_processes_share_the_episodes_of_a_step():
    args = argparse.Namespace(episodes_per_step=2, allow_more_processes=False)
    assert resolve_episodes(args, 1) == [] and args.episodes_per_process == 2
    assert resolve_episodes(args, 2) == [] and args.episodes_per_process == 1
    with pytest.raises(SettingsError, match="3 processes, but the recipe averages 2 episode"):
        resolve_episodes(args, 3)
    args.allow_more_processes = True
    assert "not the published recipe" in resolve_episodes(args, 3)[0]
    assert (args.episodes_per_step, args.episodes_per_process) == (3, 1)
    with pytest.raises(SettingsError, match="cannot be split evenly over 3 processes"):
        resolve_episodes(argparse.Namespace(episodes_per_step=4, allow_more_processes=False), 3)


def test_process_count_is_a_divisor_of_the_episodes_the_gpus_allow():
    args = argparse.Namespace(device=None, allow_more_processes=False)
    assert [launch.process_count(args, 2, gpus) for gpus in (0, 1, 2, 8)] == [1, 1, 2, 2]
    assert [launch.process_count(args, 4, gpus) for gpus in (3, 8)] == [2, 4]
    for device in ("cpu", "cuda:1"):
        assert launch.process_count(argparse.Namespace(device=device, allow_more_processes=True), 2, 8) == 1
    args.allow_more_processes = True
    assert launch.process_count(args, 2, 8) == 8


@pytest.mark.parametrize("model", ["bml", "local", "global"])
def test_step_plan_does_not_depend_on_how_many_processes_share_it(tmp_path, model):
    """Rank r of 2 processes runs exactly slot r of the 1-process plan: same episodes, same batches."""
    args = apply_recipe(train_baseline.get_args_parser().parse_args([*TINY, "--batch_size", "16"]))
    args.model, args.episodes_per_step, args.episodes_per_epoch = model, 2, 5
    args.global_batch = 4 if model == "bml" else 0
    labels = np.repeat(np.arange(12), 10)
    args.world_size, args.episodes_per_process = 1, 2
    single = step_plan(args, labels, epoch=3, rank=0)
    args.world_size, args.episodes_per_process = 2, 1
    split = np.concatenate([step_plan(args, labels, epoch=3, rank=rank) for rank in (0, 1)], axis=1)
    np.testing.assert_array_equal(single, split)
    if model == "global":   # as the original on 2 GPUs: each slot passes once over the data, len // batch steps
        assert single.shape == (120 // 16, 2, 16)
        assert all(len(set(single[:, slot].ravel())) == single[:, slot].size for slot in (0, 1))
        assert not np.array_equal(single[:, 0], single[:, 1])


def test_shell_scripts_dry_run_and_find_python3(tmp_path):
    """`bash train_bml.sh DATASET --dry_run`: one JSON object with the launch command, on a PATH with only python3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    (bin_dir / "dirname").symlink_to("/usr/bin/dirname" if Path("/usr/bin/dirname").exists() else "/bin/dirname")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "PYTHONPATH")}
    env.update(PATH=str(bin_dir), OMP_NUM_THREADS="1")
    for command, model in ((["train_bml.sh", "FC100"], "bml"), (["train_baseline.sh", "miniImageNet", "local"], "local")):
        result = subprocess.run(["/bin/bash", str(ROOT / command[0]), *command[1:], "--dry_run"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert (plan["model"], plan["episodes_per_step"], plan["world_size"], plan["amp"]) == (model, 2, 1, "off")
        assert plan["launch"].startswith(sys.executable) and "--dry_run" not in plan["launch"]
    assert not (tmp_path / "output").exists()


# ----------------------------------------------------------------------------------------------
# Recipe points: tieredImageNet, validation precision, Adam


def test_tiered_chooses_nothing_on_val_it_trains_on(tmp_path, capsys):
    make_tiered(tmp_path / "data", classes=(6, 3, 5), images_per_class=8)
    folder = tmp_path / "run"
    args = train_bml.get_args_parser().parse_args(
        [*TINY[2:], "--dataset", "tieredImageNet", "--data_root", str(tmp_path / "data"), "--epochs", "1",
         "--episodes_per_epoch", "1", "--episodes_per_step", "1", "-s", str(folder)])
    assert train_bml.main(args) == 0
    assert "no checkpoint is chosen on val" in capsys.readouterr().out
    assert not (folder / "best.pth").exists() and (folder / "last.pth").exists()
    assert not any(key.startswith("val_") for key in epoch_log(folder)[0])
    assert read_checkpoint(folder / "last.pth")["config"].val_split is None


def test_validation_runs_at_eval_bml_precision(tmp_path, monkeypatch):
    """Training in bf16 still validates (and chooses best.pth) in fp32, eval_bml.py's default."""
    import bml.training.driver

    seen = []
    original = bml.training.driver.evaluate
    monkeypatch.setattr(bml.training.driver, "evaluate", lambda *a, **k: seen.append(k["amp"]) or original(*a, **k))
    assert train_bml.main(bml_args(tmp_path, "--epochs", "1", "--episodes_per_epoch", "1", "--eval_freq", "1",
                                   "--amp", "bf16")) == 0
    assert seen == ["off"] and read_checkpoint(tmp_path / "best.pth")["config"].amp == "bf16"


def test_adam_has_no_weight_decay_as_the_original():
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(argparse.Namespace(optim="adam", lr=1e-3), model).param_groups[0]["weight_decay"] == 0
    assert build_optimizer(argparse.Namespace(optim="SGD", lr=0.1), model).param_groups[0]["weight_decay"] == 5e-4


# ----------------------------------------------------------------------------------------------
# fp16 with the gradient scaler, channels_last, compile, DDP: the engine on a CPU


def tiny_episodes(steps: int, episodes: int = 1, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of (episodes, 25, 3, 32, 32) images and base labels, as the step loader yields them."""
    generator = torch.Generator().manual_seed(seed)
    count = WAY * (SHOT + QUERY)
    return [(torch.randn(episodes, count, 3, SIZE, SIZE, generator=generator),
             episode_labels(WAY, count).repeat(episodes, 1)) for _ in range(steps)]


def tiny_parts(amp: str = "off", clip_grad: float = 0.0, channels_last: bool = False, ddp_context=None,
               seed: int = 0) -> TrainComponents:
    torch.manual_seed(seed)
    model = BML(num_classes=8, width=0.125, drop_rate=0.0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    context = ddp_context or DistributedContext(0, 0, 1, torch.device("cpu"))
    loss_module, ddp = wrap_for_training(argparse.Namespace(compile=False), model, context)
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return TrainComponents(model=model, loss_module=loss_module, ddp=ddp,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                           scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=amp == "fp16"), device=torch.device("cpu"),
                           amp_dtype=dtype, channels_last=channels_last, clip_grad=clip_grad)


def train_steps(parts: TrainComponents, batches, state: TrainingState, tmp_path: Path) -> None:
    train_one_epoch(parts, batches, state, epoch=1, epochs=4, steps_per_epoch=len(batches), loss_settings=SETTINGS,
                    stop_requested=lambda: False, logger=RunLogger(tmp_path, enabled=False), print_freq=100,
                    is_main=False)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_fp16_scaler_skips_overflowing_steps(tmp_path, monkeypatch):
    """An overflowing step leaves the weights as they were and halves the scale; the next step applies."""
    parts, state = tiny_parts("fp16"), TrainingState()
    batches = tiny_episodes(3)
    forward = parts.loss_module.forward
    calls = []

    def overflow_second_call(*args):
        calls.append(1)
        losses = forward(*args)
        return {**losses, "total": losses["total"] * float("inf")} if len(calls) == 2 else losses

    monkeypatch.setattr(parts.loss_module, "forward", overflow_second_call)
    snapshots, scales = [], []
    for batch in batches:
        train_steps(parts, [batch], state, tmp_path)
        snapshots.append(weights(parts.model))
        scales.append(parts.scaler.get_scale())
    parameters = [name for name, _ in parts.model.named_parameters()]
    assert scales == [256.0, 128.0, 128.0]
    assert all(torch.equal(snapshots[0][name], snapshots[1][name]) for name in parameters)       # skipped
    assert not all(torch.equal(snapshots[1][name], snapshots[2][name]) for name in parameters)   # applied
    assert state.step == 3 and all(torch.isfinite(value.float()).all() for value in snapshots[2].values())


def test_fp16_clips_the_unscaled_gradients(tmp_path):
    """The logged norm is the true one (unscale_ before clipping), not 256 times it; the step stays bounded."""
    norms, moved = {}, {}
    batches = tiny_episodes(1)
    for amp in ("off", "fp16"):
        parts, state = tiny_parts(amp, clip_grad=1e-3), TrainingState()
        before = torch.cat([p.detach().flatten().clone() for p in parts.model.parameters()])
        train_steps(parts, batches, state, tmp_path)
        after = torch.cat([p.detach().flatten() for p in parts.model.parameters()])
        norms[amp], moved[amp] = state.epoch_sums["grad_norm"], (after - before).norm().item()
        assert moved[amp] <= 0.1 * (1e-3 + 5e-4 * before.norm().item()) * 1.001
    assert norms["off"] > 1e-2 and abs(norms["fp16"] - norms["off"]) < 0.05 * norms["off"]


def test_channels_last_and_bf16_steps_match_fp32(tmp_path):
    """channels_last gives the fp32 step's gradients up to summation order; bf16 autocast to bf16 precision."""
    batch = tiny_episodes(1)[0]
    gradients = {}
    for name, amp, channels_last in (("fp32", "off", False), ("channels_last", "off", True), ("bf16", "bf16", False)):
        parts = tiny_parts(amp, channels_last=channels_last)
        forward_backward(parts, *batch, SETTINGS, step=0)
        gradients[name] = torch.cat([p.grad.flatten() for p in parts.model.parameters()])
    reference = gradients["fp32"]

    def relative(name: str) -> float:
        return float((gradients[name] - reference).norm() / reference.norm())

    assert relative("channels_last") < 2e-3      # other convolution algorithms: another summation order
    assert 0 < relative("bf16") < 0.5            # 8 mantissa bits; 0.1-0.3 at random initialisation


def test_fp16_resume_restores_the_scaler(tmp_path, monkeypatch):
    """fp16 on the CPU through the driver: overflows (the scale drops from 65536), SIGTERM, --is_continue: the same
    weights and scaler state as a run that was never interrupted."""
    original = BML.losses

    def install(actions: dict):
        calls = {"count": 0}

        def losses(self, *args, **kwargs):
            calls["count"] += 1
            result = original(self, *args, **kwargs)
            action = actions.get(calls["count"])
            return action(result) if action else result

        monkeypatch.setattr(BML, "losses", losses)

    def overflow(losses):
        return {**losses, "total": losses["total"] * float("inf")}

    def terminate(losses):
        os.kill(os.getpid(), signal.SIGTERM)
        return losses

    extra = ("--epochs", "2", "--episodes_per_epoch", "2", "--eval_freq", "0", "--amp", "fp16")
    install({2: overflow})
    assert train_bml.main(bml_args(tmp_path / "straight", *extra)) == 0
    install({2: overflow, 3: terminate})
    assert train_bml.main(bml_args(tmp_path / "resumed", *extra)) == 128 + signal.SIGTERM
    install({})
    assert train_bml.main(bml_args(tmp_path / "resumed", *extra, "--is_continue")) == 0
    straight = read_checkpoint(tmp_path / "straight" / "last.pth")
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pth")
    assert straight["scaler"]["scale"] < 65536.0 and straight["config"].amp == "fp16"
    assert straight["scaler"] == resumed["scaler"]
    assert all(torch.equal(straight["model"][key], resumed["model"][key]) for key in straight["model"])


def test_compile_does_not_recompile_between_epochs(tmp_path, monkeypatch):
    """torch.compile through the driver, with a backend that counts the graphs it is given: the count after
    each epoch stays what the first epoch compiled (a new epoch must not specialise a new graph)."""
    import bml.training.driver

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compile_(module, backend=counting_backend))
    per_epoch = []
    end_epoch = bml.training.driver.end_epoch
    monkeypatch.setattr(bml.training.driver, "end_epoch", lambda *args: per_epoch.append(len(graphs)) or end_epoch(*args))
    torch._dynamo.reset()
    assert train_bml.main(bml_args(tmp_path, "--epochs", "3", "--episodes_per_epoch", "2", "--eval_freq", "3",
                                   "--compile")) == 0
    torch._dynamo.reset()
    assert per_epoch[0] > 0 and per_epoch == [per_epoch[0]] * 3
    assert "val_acc" in epoch_log(tmp_path)[-1]


def _ddp_worker(rank: int, init_file: str, batch, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        parts = tiny_parts(ddp_context=DistributedContext(rank, rank, 2, torch.device("cpu")), seed=rank)
        images, labels = batch
        forward_backward(parts, images[rank:rank + 1], labels[rank:rank + 1], SETTINGS, step=0)
        torch.save({name: p.grad for name, p in parts.model.named_parameters()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_of_one_episode_equal_one_process_of_two(tmp_path):
    """Gloo DDP, one episode per process, gives the averaged gradients of one process running both episodes
    (each its own forward pass and BatchNorm statistics), on every rank. Rank 1 starts from other weights:
    DDP broadcasts rank 0's."""
    batch = tiny_episodes(1, episodes=2)[0]
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), batch, str(tmp_path)), nprocs=2, join=True)
    parts = tiny_parts()
    forward_backward(parts, *batch, SETTINGS, step=0)
    for rank in (0, 1):
        gradients = torch.load(tmp_path / f"rank{rank}.pt")
        for name, parameter in parts.model.named_parameters():
            torch.testing.assert_close(gradients[name], parameter.grad, rtol=1e-4, atol=1e-6)
