"""As published and as the original's users type it: the recipes per data set and method, the original's
DropBlock counter, its checkpoints, TF32 named as such, its launch, its flags and its `-s` parent folder.

Every check is a dry run or a unit of the training loop, except one tiny run on the embedded glyphs set.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import train_baseline
import train_bml
from bml import launch
from bml.checkpoint import read_checkpoint
from bml.models import BML, build_model
from bml.models.dropblock import keep_probability
from bml.recipes import BML_LOSSES
from bml.training import apply_recipe
from bml.training.driver import announce
from bml.training.run_data import RunData
from bml.training.engine import forward_backward
from bml.training.run_folder import claim_run_folder, resume_command
from bml.training.settings import finish_settings
from bml.training.state import TrainComponents
from bml.training.step_plan import dropblock_counter
from bml.training.wrappers import build_optimizer, wrap_for_training
from bml.utils.distributed import DistributedContext
from test_training import ROOT, TINY, epoch_log, one_thread  # noqa: F401  (autouse)

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
PUBLISHED_SCHEDULE = [[1, 0.1], [51, 0.006], [71, 0.0012]]
EVERY_40 = [[1, 0.1], [41, 0.01], [81, 0.001], [121, 0.0001], [161, 1e-05]]


def plan_of(capsys, script, argv: list[str]) -> dict:
    """The --dry_run plan of `script` (train_bml / train_baseline) for `argv`."""
    assert script.main(script.get_args_parser().parse_args([*argv, "--dry_run"])) == 0
    return json.loads(capsys.readouterr().out)


def original_keep(t: int, drop_rate: float = 0.1) -> float:
    """The original's keep rate after its block's t-th forward pass."""
    return max(1.0 - drop_rate / (20 * 2000) * t, 1.0 - drop_rate)


def original_counts(epochs: int, passes_per_epoch: int, steps_per_epoch: int) -> list[int]:
    """The original's DropBlock counter at the pass of each of our steps: its loop, counting every training
    pass (`passes_per_epoch`, of which our steps are the first `steps_per_epoch`) and the 2,000 test
    episodes it ran after every 20th epoch."""
    t, counts = 0, []
    for epoch in range(1, epochs + 1):
        for batch in range(passes_per_epoch):
            t += 1
            if batch < steps_per_epoch:
                counts.append(t)
        if epoch % 20 == 0:
            t += 2000
    return counts


def recipe_args(script, *argv: str) -> argparse.Namespace:
    return apply_recipe(script.get_args_parser().parse_args(list(argv)))


# 1. Recipes per data set and method


@pytest.mark.parametrize("mode", ["global", "local"])
def test_tiered_baselines_train_the_originals_100_epochs_decayed_at_40_and_80(capsys, mode):
    plan = plan_of(capsys, train_baseline, ["--dataset", "tieredImageNet", "--mode", mode])
    assert plan["epochs"] == 100 and plan["lr_schedule"] == [[1, 0.1], [41, 0.01], [81, 0.001]]
    bml = plan_of(capsys, train_bml, ["--dataset", "tieredImageNet"])
    assert bml["epochs"] == 200 and bml["lr_schedule"] == EVERY_40   # BML keeps its 200 epochs


def test_decay_step_decays_every_n_epochs_as_the_original(capsys):
    plan = plan_of(capsys, train_bml, ["--dataset", "miniImageNet", "--decay_step", "30"])
    assert plan["lr_schedule"] == [[1, 0.1], [31, 0.01], [61, 0.001], [91, 0.0001]]
    # tieredImageNet decays every 40 epochs whatever --epochs is, as the original did
    plan = plan_of(capsys, train_bml, ["--dataset", "tieredImageNet", "--epochs", "90"])
    assert plan["lr_schedule"] == [[1, 0.1], [41, 0.01], [81, 0.001]]


# 2. The DropBlock ramp


def test_original_counter_reproduces_the_originals_bml_ramp():
    args = recipe_args(train_bml, "--dataset", "miniImageNet")
    assert args.dropblock_counter == "original"
    count = dropblock_counter(args, num_images=38400)
    expected = original_counts(100, 500, 500)
    ours = [count(step) for step in range(len(expected))]
    assert ours == expected
    keeps = [keep_probability(0.1, t) for t in ours]
    assert keeps == pytest.approx([original_keep(t) for t in expected], abs=1e-12)
    assert keeps.index(0.9) // 500 + 1 == 68   # full drop in epoch 68, not 80


def test_steps_counter_counts_training_steps_only():
    args = recipe_args(train_bml, "--dataset", "miniImageNet", "--dropblock_counter", "steps")
    count = dropblock_counter(args, num_images=38400)
    keeps = [keep_probability(0.1, count(step)) for step in range(50000)]
    assert keeps.index(0.9) // 500 + 1 == 81   # the ramp of the training steps: over after epoch 80
    # the original's formula at a counter that skips the test episodes
    assert keeps[:40000] == pytest.approx([original_keep(t) for t in range(40000)], abs=1e-12)


def test_baseline_global_ends_at_the_originals_keep_rate():
    args = recipe_args(train_baseline, "--dataset", "miniImageNet", "--mode", "global")
    last_step = 100 * (38400 // 128) - 1
    assert keep_probability(0.1, dropblock_counter(args, 38400)(last_step)) == pytest.approx(0.905)
    args = recipe_args(train_baseline, "--dataset", "miniImageNet", "--mode", "global", "--dropblock_counter", "steps")
    assert keep_probability(0.1, dropblock_counter(args, 38400)(last_step)) == pytest.approx(0.925, abs=1e-5)


def test_original_counter_counts_the_originals_partial_batch():
    """The original's loader kept an epoch's last, partial batch: a pass that is no step here."""
    args = recipe_args(train_baseline, "--dataset", "FC100", "--mode", "global")
    count = dropblock_counter(args, num_images=1000)   # 7 full batches of 128 and one of 104
    assert [count(step) for step in range(7 * 45)] == original_counts(45, 8, 7)


def test_the_training_step_sets_the_counter_it_is_given():
    torch.manual_seed(0)
    model = BML(num_classes=8, width=0.125, drop_rate=0.1)
    loss_module, _ = wrap_for_training(argparse.Namespace(compile=False), model, CPU)
    parts = TrainComponents(model=model, loss_module=loss_module, ddp=None,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                            amp_dtype=None, channels_last=False, dropblock_count=lambda step: 1000 * step)
    seen = []
    for block in model.dropblocks():
        block.register_forward_pre_hook(lambda module, inputs: seen.append(module.step))
    images = torch.randn(2, 10, 3, 32, 32)
    labels = torch.arange(5).repeat(2).expand(2, 10)
    settings = {"way": 5, "shot": 1, "query": 1, "epoch": torch.tensor(1.0, dtype=torch.float64), "max_epoch": 4,
                **BML_LOSSES.model_settings()}
    forward_backward(parts, images, labels, settings, step=7)
    assert set(seen) == {7000} and len(seen) == 2 * len(model.dropblocks())   # both episodes of the step
    assert model.dropblock_step == 8000


# 3 and 4: checkpoints every 20 epochs; precision named tf32 where TF32 runs


@pytest.mark.parametrize("script, argv", [
    (train_bml, ["--dataset", "miniImageNet"]), (train_bml, ["--dataset", "tieredImageNet"]),
    (train_baseline, ["--dataset", "tieredImageNet", "--mode", "local"]),
    (train_baseline, ["--dataset", "CUB", "--mode", "global"])])
def test_published_recipes_keep_a_checkpoint_every_20_epochs(capsys, script, argv):
    assert plan_of(capsys, script, argv)["save_freq"] == 20


@pytest.mark.parametrize("capability, flags, precision", [
    ((8, 0), [], "tf32"), ((9, 0), [], "tf32"), ((7, 0), [], "fp32"), ((8, 0), ["--tf32", "off"], "fp32"),
    ((8, 0), ["--amp", "bf16"], "bf16")])
def test_plan_and_log_name_tf32_when_it_runs(simulate_gpu, capsys, capability, flags, precision):
    simulate_gpu(capability, name="NVIDIA A100" if capability >= (8, 0) else "Tesla V100")
    assert plan_of(capsys, train_bml, ["--dataset", "miniImageNet", *flags])["precision"] == precision
    args = train_bml.get_args_parser().parse_args(["--dataset", "miniImageNet", *flags])
    context = DistributedContext(rank=0, local_rank=0, world_size=2, device=torch.device("cuda", 0))
    finish_settings(args, context)
    assert args.precision == precision   # config.json is args as the run stores it
    args.num_classes = 64
    announce(args, context, RunData(train_set=range(100), val_set=range(10), steps=500), Path("run"))
    log = capsys.readouterr().out
    assert f"precision {precision};" in log
    validation = "fp32" if capability < (8, 0) or "off" in flags else "tf32"   # validation runs without autocast
    assert f"Validation on val in {validation}" in log


def test_a_run_records_its_counter_precision_and_saves_every_save_freq(tmp_path):
    argv = [*TINY, "--epochs", "2", "--episodes_per_epoch", "3", "--eval_freq", "0", "--save_freq", "1",
            "--dropblock_counter", "original", "-s", str(tmp_path / "params")]
    assert train_bml.main(train_bml.get_args_parser().parse_args(argv)) == 0
    (folder,) = (tmp_path / "params").iterdir()
    config = json.loads((folder / "config.json").read_text())
    assert config["dropblock_counter"] == "original" and config["precision"] == "fp32"
    assert {path.name for path in folder.glob("epoch_*.pth")} == {"epoch_1.pth", "epoch_2.pth"}
    checkpoint = read_checkpoint(folder / "last.pth")
    assert checkpoint["dropblock_step"] == 6 + 1   # 6 steps, the next pass counted as the original's
    assert len(epoch_log(folder)) == 2


# 6. The original's launch


@pytest.mark.parametrize("script", [train_bml, train_baseline])
@pytest.mark.parametrize("flag", [["--local-rank=0"], ["--local_rank", "0"], ["--local_rank=1"]])
def test_torch_distributed_launch_flags_are_accepted(capsys, monkeypatch, script, flag):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    plan = plan_of(capsys, script, [*flag, "--dataset", "miniImageNet"])
    assert (plan["world_size"], plan["episodes_per_step"], plan["episodes_per_process"]) == (2, 2, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")   # the global-episodes rule, whoever started the processes
    args = script.get_args_parser().parse_args([*flag, "--dataset", "miniImageNet", "--dry_run"])
    assert script.main(args) == 1
    assert "4 processes, but the recipe averages 2" in capsys.readouterr().err


# 7. The original's flags


def test_original_optimisation_flags_reach_the_optimiser():
    args = recipe_args(train_bml, "--weight_decay", "1e-4", "--momentum", "0.5", "--print_freq", "100")
    group = build_optimizer(args, torch.nn.Linear(2, 2)).param_groups[0]
    assert (group["weight_decay"], group["momentum"], args.print_freq) == (1e-4, 0.5, 100)
    group = build_optimizer(recipe_args(train_bml), torch.nn.Linear(2, 2)).param_groups[0]
    assert (group["weight_decay"], group["momentum"]) == (5e-4, 0.9)


@pytest.mark.parametrize("mode, run_name", [("bml", "_bml_"), ("global", "_baseline-global_"),
                                            ("local", "_baseline-local_")])
def test_train_bml_trains_every_mode_as_the_originals_one_script(capsys, mode, run_name):
    plan = plan_of(capsys, train_bml, ["--dataset", "CUB", "--mode", mode])
    assert plan["model"] == mode and run_name in plan["save_folder"]


def test_spatial_is_baseline_globals_per_position_loss(capsys):
    plan = plan_of(capsys, train_bml, ["--dataset", "CUB", "--mode", "global", "--spatial"])
    assert plan["save_folder"].endswith("_b128_spatial_SGD_lr0.1_e100_s0")
    args = recipe_args(train_bml, "--mode", "global", "--spatial")
    args.num_classes = 10
    assert build_model(args).spatial
    assert train_bml.main(train_bml.get_args_parser().parse_args(["--spatial", "--dry_run"])) == 1
    assert "--spatial applies to --mode global or local" in capsys.readouterr().err


def test_is_eval_names_the_eval_bml_command(capsys):
    argv = ["--dataset", "miniImageNet", "--transform", "A", "--is_eval", "--ckp_path", "w.pth", "--n_shots", "5"]
    assert train_bml.main(train_bml.get_args_parser().parse_args(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    command = err.split("run: ", 1)[1]
    assert shlex.split(command) == ["python", "eval_bml.py", "--dataset", "miniImageNet", "--ckp_path", "w.pth",
                                    "--transform", "A", "--n_shots", "5"]


ORIGINAL_FLAGS = ("--mode", "--backbone", "--eval_freq", "--print_freq", "--save_freq", "--batch_size", "--num_workers",
                  "--epochs", "--weight_decay", "--momentum", "--decay_step", "--optim", "--dataset", "--transform",
                  "--n_ways", "--n_shots", "--n_queries", "--n_train_ways", "--n_train_shots", "--n_train_queries",
                  "--episodes", "--weights", "--alpha_1", "--alpha_2", "--T", "--spatial", "--is_continue",
                  "--is_eval", "--ckp_path", "-s", "--local_rank", "--amp_opt_level", "--seed")
"""Every flag of the original's config.py."""


def test_readme_maps_every_flag_of_the_original():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The original's flags", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    mapped = {re.match(r"\| `([^`]+)`", row).group(1).split(" ")[0]: row for row in rows}
    assert set(mapped) == set(ORIGINAL_FLAGS)
    parser = train_bml.get_args_parser()
    accepted = {option for action in parser._actions for option in action.option_strings}
    for flag in ORIGINAL_FLAGS:   # each one is still accepted by train_bml.py
        assert flag in accepted, flag


# 8. -s is the parent folder


def test_s_is_the_parent_folder_and_run_folder_the_exact_one(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_bml.py", "-s", str(tmp_path / "params")])
    args = train_bml.get_args_parser().parse_args(["-s", str(tmp_path / "params")])
    finish_settings(args, CPU)
    name = Path(args.save_folder).name
    assert Path(args.save_folder).parent == tmp_path / "params" and name.startswith("glyphs_bml_Res12")
    (tmp_path / "params" / name).mkdir(parents=True)
    (tmp_path / "params" / name / "last.pth").write_bytes(b"")
    with contextlib.ExitStack() as resources:   # the original's second run with -s params: the next free name
        assert claim_run_folder(args, False, resources) == tmp_path / "params" / f"{name}-2"
    args = train_bml.get_args_parser().parse_args(["--run_folder", str(tmp_path / "params" / name)])
    finish_settings(args, CPU)
    with contextlib.ExitStack() as resources, pytest.raises(ValueError, match="--run_folder"):
        claim_run_folder(args, True, resources)   # an exact folder that holds a run is refused
    args.save_folder = str(tmp_path / "params" / f"{name}-2")
    command = shlex.split(resume_command(args))
    assert "-s" not in command and command[-3:] == ["--run_folder", args.save_folder, "--is_continue"]


# Done when: the original's training lines run to their dry-run plan with its schedule


ORIGINAL_TRAIN_BML = """\
-s params --dataset miniImageNet --transform A
-s params --dataset tieredImageNet --transform B --epochs 200
-s params --dataset CIFAR-FS --transform D
-s params --dataset FC100 --transform C
-s params --dataset CUB --transform E"""
ORIGINAL_TRAIN_BASELINE = "\n".join(f"--mode {mode} -s params_baseline --dataset {dataset} --transform {transform}"
                                    for dataset, transform in (("miniImageNet", "A"), ("tieredImageNet", "B"),
                                                               ("CIFAR-FS", "D"), ("FC100", "C"), ("CUB", "E"))
                                    for mode in ("local", "global"))
ORIGINAL_LINES = [("train_bml.py", line) for line in ORIGINAL_TRAIN_BML.splitlines()] + \
                 [(script, line) for line in ORIGINAL_TRAIN_BASELINE.splitlines()
                  for script in ("train_baseline.py", "train_bml.py")]


@pytest.mark.parametrize("script, line", ORIGINAL_LINES)
def test_the_originals_training_lines_dry_run_with_its_schedule(capsys, monkeypatch, script, line):
    """`python3 -m torch.distributed.launch --nproc_per_node 2 main_multi_gpu.py LINE`, main_multi_gpu.py
    replaced by this project's script: the launcher's environment and its --local-rank flag."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    module = launch.load_script(ROOT / script)
    plan = plan_of(capsys, module, ["--local-rank=0", *line.split()])
    argv = line.split()
    dataset, mode = argv[argv.index("--dataset") + 1], argv[argv.index("--mode") + 1] if "--mode" in argv else "bml"
    tiered = dataset == "tieredImageNet"
    epochs = 200 if tiered and mode == "bml" else 100
    schedule = EVERY_40[:math.ceil(epochs / 40)] if tiered else PUBLISHED_SCHEDULE
    assert (plan["model"], plan["epochs"], plan["lr_schedule"]) == (mode, epochs, schedule)
    assert (plan["world_size"], plan["episodes_per_step"], plan["episodes_per_process"]) == (2, 2, 1)
    assert (plan["transform"], plan["optim"], plan["amp"]) == (argv[argv.index("--transform") + 1], "SGD", "off")
    assert (plan["save_freq"], plan["dropblock_counter"]) == (20, "original")
    assert Path(plan["save_folder"]).parent == Path(argv[argv.index("-s") + 1])
    assert plan["steps_per_epoch"] == (None if mode == "global" else 500)
