"""Training: recipes, the shared loop, exact resume, signals, non-finite losses, DDP and the shell scripts.

Every run uses the embedded `glyphs` set (built once per session in a temporary cache by conftest),
a width-0.125 network on 32 px images and a few small episodes per epoch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_baseline
import train_bml
from bml.checkpoint import read_checkpoint
from bml.datasets import dataset_defaults
from bml.models import BML
from bml.recipes import get_recipe, lr_factor
from bml.training import SettingsError, apply_recipe, default_save_folder, parse_weights
from bml.training.step_plan import step_plan, steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BIN = Path(sys.executable).parent
# Every recipe flag the tests depend on is pinned, so that they do not follow changes of the demo's recipe.
TINY = ["--dataset", "glyphs", "--width", "0.125", "--image_size", "32", "--n_train_ways", "5",
        "--n_train_shots", "2", "--n_train_queries", "3", "--epochs", "4", "--episodes_per_epoch", "50",
        "--eval_freq", "4", "--clip_grad", "0", "--val_episodes", "20", "--num_workers", "0", "--print_freq", "1"]


def bml_args(save_folder: Path, *extra: str):
    return train_bml.get_args_parser().parse_args([*TINY, "--run_folder", str(save_folder), *extra])


def baseline_args(save_folder: Path, *extra: str):
    return train_baseline.get_args_parser().parse_args([*TINY, "--run_folder", str(save_folder), *extra])


def epoch_log(save_folder: Path) -> list[dict]:
    return [json.loads(line) for line in (save_folder / "log.txt").read_text().splitlines()]


def subprocess_env() -> dict[str, str]:
    """The venv first on PATH (as the Makefile does), one thread per process (the CPU is shared)."""
    return {**os.environ, "PATH": f"{PYTHON_BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared CPU, spinning OpenMP threads slow tiny models down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def on_losses_call(monkeypatch):
    """on_losses_call(n, fn): make the n-th call of BML.losses run fn(losses) first (n counts from 1)."""
    original = BML.losses

    def install(call_number: int, action):
        calls = {"count": 0}

        def losses(self, *args, **kwargs):
            calls["count"] += 1
            result = original(self, *args, **kwargs)
            return action(result) if calls["count"] == call_number else result

        monkeypatch.setattr(BML, "losses", losses)

    return install


def send_sigterm(losses):
    """An `on_losses_call` action: SIGTERM this process, as a scheduler stopping the job would."""
    os.kill(os.getpid(), signal.SIGTERM)
    return losses


# ----------------------------------------------------------------------------------------------
# Settings


def test_recipes_fill_only_what_is_not_given():
    args = train_bml.get_args_parser().parse_args(["--dataset", "tieredImageNet", "--width", "0.5"])
    apply_recipe(args)
    assert (args.epochs, args.transform, args.width, args.lr, args.n_train_ways) == (200, "B", 0.5, 0.1, 15)
    assert args.lr_milestones == [40, 80, 120, 160] and args.lr_gammas == [0.1] * 4
    assert train_bml.get_args_parser().parse_args([]).dataset == "glyphs"   # as train_bml.sh without arguments
    mini = apply_recipe(train_bml.get_args_parser().parse_args(["--dataset", "miniImageNet"]))
    assert (mini.dataset, mini.epochs, mini.episodes_per_epoch, mini.eval_freq) == ("miniImageNet", 100, 500, 20)
    assert [round(0.1 * lr_factor(done, mini.lr_milestones, mini.lr_gammas), 6) for done in (49, 50, 69, 70)] \
        == [0.1, 0.006, 0.006, 0.0012]
    adam = apply_recipe(train_bml.get_args_parser().parse_args(["--dataset", "miniImageNet", "--optim", "adam"]))
    assert adam.lr == 1e-3 and adam.lr_gammas == [0.1, 0.1]
    assert "_b128_" not in str(default_save_folder(mini))   # --mode global's batch size is no BML setting
    assert mini.clip_grad == 0.0
    omniglot = apply_recipe(train_bml.get_args_parser().parse_args(["--dataset", "omniglot"]))
    assert (omniglot.n_train_ways, omniglot.n_train_shots, omniglot.n_train_queries, omniglot.clip_grad,
            omniglot.width, omniglot.image_size) == (100, 1, 1, 10.0, 0.25, 28)


def test_settings_helpers(tmp_path):
    assert parse_weights("2_1_0.5") == (2.0, 1.0, 0.5)
    with pytest.raises(SettingsError, match="three numbers"):
        parse_weights("2_1")
    args = apply_recipe(bml_args(tmp_path))
    args.model, args.save_folder = "bml", None
    assert default_save_folder(args).name == "glyphs_bml_Res12_w0.125_32px_5w2s3q_wt2_1_0.5_a5.5_0.1_T4_SGD_lr0.1_e4_s0"
    args.clip_grad = 10.0
    assert default_save_folder(args).name.endswith("_SGD_lr0.1_clip10_e4_s0")
    args.clip_grad = 0.0
    args.episodes_per_step = 3
    assert default_save_folder(args).name.endswith("_T4_x3_SGD_lr0.1_e4_s0")   # differs from the recipe's 1


def test_global_batch_follows_each_episode_in_the_step_plan(tmp_path, capsys):
    args = apply_recipe(bml_args(tmp_path, "--global_batch", "6", "--episodes_per_epoch", "4"))
    args.model, args.world_size, args.episodes_per_process, args.save_folder = "bml", 1, 1, None
    assert default_save_folder(args).name.endswith("_T4_gb6_SGD_lr0.1_e4_s0")
    labels = np.repeat(np.arange(12), 10)
    plan = step_plan(args, labels, epoch=1, rank=0)
    episode = 5 * (2 + 3)
    assert plan.shape == (4, 1, episode + 6)
    grid = labels[plan[:, 0, :episode]].reshape(4, 5, 5)                  # shot-major episodes come first
    assert (grid == grid[:, :1]).all()
    shuffled = plan[:, 0, episode:].reshape(-1)
    assert len(set(shuffled.tolist())) == len(shuffled)                   # then one epoch's shuffled images
    with pytest.raises(SystemExit):
        bml_args(tmp_path / "bad", "--global_batch", "-1")
    assert "argument --global_batch: expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_clip_grad_bounds_each_step(tmp_path, capsys):
    """One SGD step from the same initial weights moves them by at most lr * (clip + wd * |w|)."""
    def weights_after_one_step(name: str, *extra: str) -> torch.Tensor:
        assert train_bml.main(bml_args(tmp_path / name, "--epochs", "1", "--episodes_per_epoch", "1",
                                       "--eval_freq", "0", *extra)) == 0
        model = read_checkpoint(tmp_path / name / "last.pth")["model"]
        return torch.cat([value.flatten().float() for key, value in model.items() if key.endswith("weight")])

    initial = weights_after_one_step("initial", "--lr", "0")
    clip, lr, weight_decay = 1e-3, 0.1, 5e-4
    clipped = (weights_after_one_step("clipped", "--clip_grad", str(clip)) - initial).norm()
    unclipped = (weights_after_one_step("unclipped") - initial).norm()
    bound = lr * (clip + weight_decay * initial.norm())
    assert clipped <= bound * 1.001 < unclipped / 10
    assert epoch_log(tmp_path / "clipped")[-1]["train_grad_norm"] > 10 * clip   # the norm before clipping
    assert "train_grad_norm" not in epoch_log(tmp_path / "unclipped")[-1]
    with pytest.raises(SystemExit):
        bml_args(tmp_path / "bad", "--clip_grad", "-1")
    assert "argument --clip_grad: expected a number >= 0, got '-1'" in capsys.readouterr().err


def test_loss_decreases_and_checkpoints_are_complete(tmp_path):
    folder = tmp_path / "run"
    args = bml_args(folder, "--epochs", "3", "--episodes_per_epoch", "15", "--n_train_shots", "3",
                    "--alpha_1", "0", "--lr", "0.05", "--eval_freq", "3")
    assert train_bml.main(args) == 0
    log = epoch_log(folder)
    assert [entry["epoch"] for entry in log] == [1, 2, 3]
    assert log[-1]["train_total"] < 0.75 * log[0]["train_total"]
    assert log[-1]["val_acc"] > 20.0 and {"val_acc_global", "val_acc_local", "train_mutual"} <= set(log[-1])
    checkpoint = read_checkpoint(folder / "last.pth")   # weights_only: RNG states are plain values
    assert {"model", "max_accuracy", "epoch", "config", "optimizer", "scaler", "scheduler", "rng",
            "dropblock_step", "step"} <= set(checkpoint)
    assert checkpoint["epoch"] == 3 and checkpoint["step"] == checkpoint["dropblock_step"] == 45
    assert checkpoint["max_accuracy"] == read_checkpoint(folder / "best.pth")["max_accuracy"] == log[-1]["val_acc"]
    assert checkpoint["config"].model == "bml" and checkpoint["config"].num_classes == 64
    assert json.loads((folder / "config.json").read_text())["width"] == 0.125
    assert any((folder / "tensorboard").iterdir())


@pytest.mark.parametrize("augment", [("--augment", "host"), ("--augment", "device", "--transform", "D")])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, on_losses_call, augment):
    """SIGTERM in the middle of epoch 2 (2 episodes per step), then --is_continue: the same weights,
    optimiser state and logs as a run that was never interrupted, whatever the number of loader workers;
    with the augmentation on the host and with colour jitter and flips on the device."""
    extra = ("--epochs", "2", "--episodes_per_epoch", "3", "--episodes_per_step", "2", "--eval_freq", "1", *augment)
    assert train_bml.main(bml_args(tmp_path / "straight", *extra)) == 0

    on_losses_call(9, send_sigterm)   # 9th episode: epoch 2, step 2 (3 steps of 2 episodes an epoch)
    assert train_bml.main(bml_args(tmp_path / "resumed", *extra)) == 128 + signal.SIGTERM
    interrupted = read_checkpoint(tmp_path / "resumed" / "last.pth")
    assert (interrupted["epoch"], interrupted["training_state"]["epoch_step"], interrupted["step"]) == (1, 2, 5)
    assert train_bml.main(bml_args(tmp_path / "resumed", *extra, "--num_workers", "2", "--is_continue")) == 0

    straight = read_checkpoint(tmp_path / "straight" / "last.pth")
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pth")
    assert straight["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(straight["model"][key], resumed["model"][key]) for key in straight["model"])
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert (straight["step"], straight["max_accuracy"]) == (resumed["step"], resumed["max_accuracy"])
    timings = ("train_images_per_s", "data_wait_s", "data_wait_fraction")
    drop_speed = [{k: v for k, v in entry.items() if k not in timings} for entry in epoch_log(tmp_path / "straight")]
    assert drop_speed == [{k: v for k, v in entry.items() if k not in timings} for entry in epoch_log(tmp_path / "resumed")]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, on_losses_call, capsys):
    def poison(losses):
        return {**losses, "local": losses["local"] * float("nan"), "total": losses["total"] * float("nan")}

    on_losses_call(4, poison)   # epoch 2, step 1 (3 steps an epoch)
    folder = tmp_path / "nan"
    assert train_bml.main(bml_args(folder, "--epochs", "3", "--episodes_per_epoch", "3", "--eval_freq", "0")) == 1
    message = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 1/3 (global step 4)" in message
    assert "local=nan" in message and "global=" in message and "--is_continue" in message
    checkpoint = read_checkpoint(folder / "last.pth")
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_baselines_train_one_epoch(tmp_path):
    assert train_baseline.main(baseline_args(tmp_path / "global", "--mode", "global", "--epochs", "1",
                                             "--batch_size", "256", "--eval_freq", "1")) == 0
    assert train_baseline.main(baseline_args(tmp_path / "local", "--mode", "local", "--spatial", "--epochs", "1",
                                             "--episodes_per_epoch", "3", "--eval_freq", "1")) == 0
    global_log, local_log = epoch_log(tmp_path / "global")[0], epoch_log(tmp_path / "local")[0]
    assert global_log["step"] == 3840 // 256 and "train_global" in global_log and "val_acc" in global_log
    assert local_log["step"] == 3 and "train_local" in local_log
    assert read_checkpoint(tmp_path / "local" / "best.pth")["config"].model == "local"


def test_bf16_and_channels_last_on_cpu(tmp_path):
    args = bml_args(tmp_path, "--epochs", "1", "--episodes_per_epoch", "2", "--eval_freq", "0",
                    "--amp", "bf16", "--channels_last")
    assert train_bml.main(args) == 0
    assert np.isfinite(epoch_log(tmp_path)[0]["train_total"])


# ----------------------------------------------------------------------------------------------
# Processes: SIGTERM, two ranks with Gloo, the shell script


def test_sigterm_saves_and_prints_the_resume_command(tmp_path):
    folder = tmp_path / "term"
    command = [sys.executable, str(ROOT / "train_bml.py"), *TINY, "--epochs", "50", "--episodes_per_epoch", "100",
               "--eval_freq", "0", "--run_folder", str(folder)]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("step [2/100]" in line for line in lines) and time.monotonic() < deadline:
        assert process.poll() is None, "".join(lines)
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines)
    reader.join(timeout=10)
    output = "".join(lines)
    assert "SIGTERM received" in output and "--is_continue" in output and f"--run_folder {folder}" in output
    checkpoint = read_checkpoint(folder / "last.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["training_state"]["epoch_step"] == checkpoint["step"] >= 2


HELPER = """
import sys, torch, train_bml
from bml.training import train
args = train_bml.get_args_parser().parse_args(sys.argv[2:])
args.model = "bml"
outcome = train(args)
assert outcome.exit_code == 0, outcome.exit_code
rank = int(__import__("os").environ["RANK"])
torch.save({name: p.detach() for name, p in outcome.model.named_parameters()}, f"{sys.argv[1]}/rank{rank}.pt")
"""


def test_two_processes_with_gloo_stay_in_sync(tmp_path):
    helper = tmp_path / "ddp_helper.py"
    helper.write_text(HELPER)
    folder = tmp_path / "ddp"
    command = [str(PYTHON_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(helper), str(tmp_path),
               *TINY, "--epochs", "2", "--episodes_per_epoch", "2", "--episodes_per_step", "2", "--eval_freq", "2",
               "--run_folder", str(folder)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    log = epoch_log(folder)
    assert [entry["epoch"] for entry in log] == [1, 2] and "val_acc" in log[-1]   # rank 0 alone writes
    checkpoint = read_checkpoint(folder / "last.pth")
    assert len(checkpoint["rng"]) == 2 and checkpoint["config"].world_size == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    assert all(torch.equal(checkpoint["model"][name], rank0[name]) for name in rank0)


def test_train_bml_sh_default_trains_glyphs_and_validates(tmp_path):
    """`bash train_bml.sh` with no data set: the demo, as `make demo` runs it (its recipe, shortened by flags), ending
    with the commands that use its checkpoint; the evaluation command it prints runs."""
    recipe = get_recipe("glyphs")
    result = subprocess.run(["bash", str(ROOT / "train_bml.sh"), "--epochs", "2", "--episodes_per_epoch", "10",
                             "--val_episodes", "100"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation accuracy (5-way 1-shot" in result.stdout
    (folder,) = (tmp_path / "output").iterdir()
    shape = f"{recipe.n_train_ways}w{recipe.n_train_shots}s{recipe.n_train_queries}q"
    image_size = dataset_defaults("glyphs").image_size
    assert folder.name.startswith(f"glyphs_bml_Res12_w{recipe.width:g}_{image_size}px_{shape}")
    best = read_checkpoint(folder / "best.pth")
    assert best["epoch"] == 2 and best["max_accuracy"] > 25.0
    checkpoint = Path("output") / folder.name / "best.pth"
    lines = result.stdout.splitlines()
    evaluate = lines[lines.index(next(line for line in lines if line.startswith("Evaluate it"))) + 1].split()
    assert evaluate[:2] == ["bash", str(ROOT / "eval_bml.sh")] and str(checkpoint) in evaluate
    assert f"python -m bml.predict --ckp_path {checkpoint} --support" in result.stdout
    evaluation = subprocess.run([*evaluate, "--episodes", "20", "--seeds", "0", "--num_workers", "0", "--no_progress"],
                                cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
    assert (tmp_path / "eval_results" / "glyphs_bml_eval_results_1shot.txt").is_file()


def test_resnet18_trains_one_epoch_and_evaluates(tmp_path):
    """`--backbone Res18` end to end: one training epoch, then eval_bml.py on its checkpoint."""
    folder = tmp_path / "res18"
    assert train_bml.main(bml_args(folder, "--backbone", "Res18", "--epochs", "1", "--episodes_per_epoch", "2",
                                   "--eval_freq", "1")) == 0
    checkpoint = read_checkpoint(folder / "best.pth")
    assert checkpoint["config"].backbone == "Res18" and "encoder.conv1.weight" in checkpoint["model"]
    spec = importlib.util.spec_from_file_location("eval_bml", ROOT / "eval_bml.py")
    eval_bml = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_bml)
    results = tmp_path / "results.json"
    args = eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(folder / "best.pth"), "--split", "val", "--n_shots", "1", "--episodes", "10",
         "--seeds", "0", "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path),
         "--json", str(results), "--no_progress"])
    assert eval_bml.main(args) == 0
    saved = json.loads(results.read_text())
    assert saved["model"] == "bml" and set(saved["results"]) == {"global", "local", "bml", "bml_scaled"}


def test_a_new_training_method_is_one_entry(monkeypatch):
    """A method added to bml.methods.METHODS names its runs and draws its steps without other edits."""
    from bml import methods

    toy = methods.Method("toy", "baseline-toy", batches=True, run_name_parts=lambda args: ["toyparts"])
    monkeypatch.setitem(methods.METHODS, "toy", toy)
    args = apply_recipe(train_baseline.get_args_parser().parse_args(["--dataset", "glyphs", "--batch_size", "10"]))
    args.model, args.episodes_per_process = "toy", args.episodes_per_step
    assert "_baseline-toy_" in str(default_save_folder(args)) and "_toyparts_" in str(default_save_folder(args))
    assert steps_per_epoch(args, 95) == 9
    assert step_plan(args, np.arange(95) % 5, epoch=1, rank=0).shape == (9, args.episodes_per_process, 10)
