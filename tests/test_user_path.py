"""The user's path: fine-tuning (--init_from), image-folder recipes, episode shapes checked first, --config reruns,
--estimate and the dry-run projection, progress off a terminal, the run folder only once the data opened,
--is_continue on a finished run, TensorBoard records, and the SLURM job-array script.

Tiny models on the embedded glyphs set, as tests/test_training.py (TINY).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_baseline
import train_bml
from test_training import one_thread  # noqa: F401  (an autouse fixture, used here too)
from bml.checkpoint import read_checkpoint, save_checkpoint
from bml.models import BML
from bml.recipes import FolderFacts, folder_recipe
from bml.training import SettingsError, parse_training_args, run_plan, train
from bml.training.driver import build_components
from bml.training.flags import NOT_RERUN
from bml.training.settings import finish_settings, record_training_data
from bml.utils import distributed
from bml.utils.progress import progress
from tests.test_training import ROOT, TINY, subprocess_env

CPU = distributed.DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
SHORT = ["--epochs", "1", "--episodes_per_epoch", "3", "--eval_freq", "1"]


def bml_args(*extra: str) -> argparse.Namespace:
    return parse_training_args(train_bml.get_args_parser(), [*TINY, *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One tiny finished BML run (1 epoch of 3 steps, validated and calibrated)."""
    folder = tmp_path_factory.mktemp("run") / "run"
    torch.set_num_threads(1)
    assert train(bml_args(*SHORT, "--run_folder", str(folder))).exit_code == 0
    return folder


def glyphs_checkpoint(path: Path, num_classes: int = 7, width: float = 0.125) -> dict:
    """A BML checkpoint of another data set (7 base classes), as a released or own model would be."""
    torch.manual_seed(1)
    model = BML(num_classes=num_classes, width=width)
    config = argparse.Namespace(model="bml", backbone="Res12", width=width, num_classes=num_classes,
                                dataset="glyphs", image_size=32, transform="O")
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 3, "max_accuracy": 50.0, "config": config})
    return model.state_dict()


# 1. --init_from
def test_init_from_loads_trunk_and_views_with_a_new_classifier(tmp_path, capsys):
    weights = glyphs_checkpoint(tmp_path / "source.pth")
    args = bml_args("--init_from", str(tmp_path / "source.pth"), "--run_folder", str(tmp_path / "run"))
    finish_settings(args, CPU)
    record_training_data(args, 64)
    parts = build_components(args, CPU, train_images=3840)
    state = parts.model.state_dict()
    assert all(torch.equal(state[key], weights[key]) for key in weights if not key.startswith("global_w."))
    assert state["global_w.weight"].shape[0] == 64 and weights["global_w.weight"].shape[0] == 7
    said = capsys.readouterr().out
    assert "loaded encoder" in said and "global_view" in said and "local_view" in said
    assert "new classifier over the 64 training classes" in said


def test_init_from_plan_and_width_from_the_checkpoint(tmp_path, capsys):
    glyphs_checkpoint(tmp_path / "source.pth", width=0.25)
    argv = [arg for arg in TINY if arg not in ("--width", "0.125")]
    args = parse_training_args(train_bml.get_args_parser(), [*argv, "--init_from", str(tmp_path / "source.pth")])
    plan = run_plan(args, world_size=1)
    assert args.width == 0.25
    assert plan["init_from"]["loaded"] == {"encoder": 72, "global_view": 24, "local_view": 24}
    assert "global_w" in plan["init_from"]["initialised"][0]
    with pytest.raises(SettingsError, match="--width 0.125 differs"):
        run_plan(bml_args("--init_from", str(tmp_path / "source.pth")), world_size=1)
    baseline = parse_training_args(train_baseline.get_args_parser(),
                                   [*argv, "--mode", "local", "--init_from", str(tmp_path / "source.pth")])
    with pytest.raises(SettingsError, match="fine-tune it with train_bml.py"):
        run_plan(baseline, world_size=1)


# 2. image-folder recipes
def test_folder_recipe_rule():
    recipe, size = folder_recipe(FolderFacts(train_classes=8, train_images=8 * 6, min_train_images_per_class=6,
                                             val_classes=3, min_val_images_per_class=4, image_side=40))
    assert (recipe.n_train_ways, recipe.n_train_shots, recipe.n_train_queries) == (8, 3, 3)
    assert recipe.episodes_per_epoch == 1 and recipe.episodes_per_step == 1 and size == 40
    assert (recipe.n_ways, recipe.n_queries, recipe.eval_freq) == (3, 3, 20)
    big, size = folder_recipe(FolderFacts(1000, 600_000, 600, 0, 0, 500))
    assert (big.n_train_ways, big.n_train_shots, big.n_train_queries, big.episodes_per_epoch) == (15, 5, 7, 500)
    assert big.eval_freq == 0 and size == 84
    with pytest.raises(ValueError, match="at least 2 classes of at least 2 images"):
        folder_recipe(FolderFacts(5, 9, 1, 0, 0, 32))


def image_folder(root: Path, classes: dict[str, tuple[int, int]], side: int = 24) -> None:
    """<root>/<split>/<class>/<image>.png: `classes[split]` = (classes, images per class)."""
    for split, (count, images) in classes.items():
        for c in range(count):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(images):
                pixels = np.full((side, side, 3), 10 * c + i, np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


def test_image_folder_gets_a_recipe_from_its_size(tmp_path):
    image_folder(tmp_path / "pets", {"train": (6, 4), "val": (3, 3)})
    args = parse_training_args(train_bml.get_args_parser(), ["--dataset", "pets", "--data_root", str(tmp_path),
                                                             "--width", "0.125", "--num_workers", "0"])
    plan = run_plan(args, world_size=1)
    assert (args.n_train_ways, args.n_train_shots, args.n_train_queries) == (6, 2, 2)
    assert plan["steps_per_epoch"] == 1 and plan["image_size"] == 24 and plan["episodes_per_step"] == 1
    assert (args.n_ways, args.n_queries) == (3, 2)
    assert plan["recipe"]["folder"]["train_images"] == 24 and "folder_recipe" in plan["recipe"]["rule"]


# 3. training-episode shapes checked first; 8. no run folder before the data opened
def test_training_episode_shape_checked_before_any_work(tmp_path, capsys):
    folder = tmp_path / "run"
    assert train(bml_args("--n_train_ways", "200", "--run_folder", str(folder))).exit_code == 1
    said = capsys.readouterr().err
    assert "--n_train_ways at most 64" in said and "lower --way" not in said
    assert train(bml_args("--global_batch", "1000", "--run_folder", str(folder))).exit_code == 1
    assert "lower --global_batch (at most 76)" in capsys.readouterr().err
    assert not folder.exists()


def test_missing_data_leaves_no_run_folder(tmp_path):
    folder = tmp_path / "run"
    args = parse_training_args(train_bml.get_args_parser(), [*TINY, "--dataset", "CUB", "--data_root",
                                                             str(tmp_path), "--run_folder", str(folder)])
    assert train(args).exit_code == 1
    assert not folder.exists()


# 4. --config
def test_config_reruns_the_settings_explicit_flags_win(finished_run, tmp_path):
    stored = json.loads((finished_run / "config.json").read_text())
    args = parse_training_args(train_bml.get_args_parser(),
                               ["--config", str(finished_run / "config.json"), "--seed", "3", "--run_folder", str(tmp_path)])
    finish_settings(args, CPU)
    record_training_data(args, stored["num_classes"])
    rerun = json.loads(json.dumps(vars(args), default=str))
    differing = {key for key in stored if stored[key] != rerun.get(key)}
    assert differing <= {"seed", "save_folder", "config", "config_read"} | set(NOT_RERUN)
    assert rerun["seed"] == 3 and stored["seed"] == 0
    assert rerun["n_train_ways"] == 5 and rerun["width"] == 0.125 and rerun["epochs"] == 1


def test_config_of_another_method_names_its_command(finished_run):
    with pytest.raises(SystemExit):
        parse_training_args(train_baseline.get_args_parser(), ["--config", str(finished_run / "config.json")])
    with pytest.raises(SettingsError, match="parse_training_args"):
        finish_settings(train_bml.get_args_parser().parse_args(["--config", "x.json"]), CPU)


# 8. --is_continue on a finished run; TensorBoard records
def test_is_continue_on_a_finished_run_says_so(finished_run, capsys, monkeypatch):
    monkeypatch.setattr("bml.training.driver.calibrate_checkpoints",
                        lambda *a, **k: pytest.fail("a finished run must not be recalibrated"))
    before = read_checkpoint(finished_run / "last.pth")["training_state"]
    assert train(bml_args(*SHORT, "--run_folder", str(finished_run), "--is_continue")).exit_code == 0
    assert "has finished all 1 epochs; nothing to continue" in capsys.readouterr().out
    assert read_checkpoint(finished_run / "last.pth")["training_state"] == before


def test_tensorboard_has_the_settings_and_the_step_points(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished_run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    texts = [tag for tag in events.Tags()["tensors"] if tag.startswith("settings")]
    assert texts and b"n_train_ways" in events.Tensors(texts[0])[0].tensor_proto.string_val[0]
    steps = [json.loads(line) for line in (finished_run / "log_steps.txt").read_text().splitlines()]
    points = events.Scalars("steps/train_total")
    assert [point.step for point in points] == [row["step"] for row in steps]
    assert [round(point.value, 4) for point in points] == [round(row["train_total"], 4) for row in steps]


# 5. --estimate and the dry-run projection
def test_estimate_times_real_steps_without_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bml.training.run_data.build_dataset", lambda *a, **k: pytest.fail("--estimate read data"))
    assert train(bml_args("--estimate", "--run_folder", str(tmp_path / "run"))).exit_code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images_per_step"] == 25 and result["steps"] == 4 * 50
    assert result["projected_hours"] == pytest.approx(200 * result["seconds_per_step"] / 3600, abs=1e-3)
    assert result["peak_gpu_memory_gib"] is None and not (tmp_path / "run").exists()


def test_dry_run_warns_when_the_recipe_takes_days(capsys):
    args = parse_training_args(train_bml.get_args_parser(), ["--dataset", "miniImageNet", "--device", "cpu"])
    plan = run_plan(args, world_size=1)
    assert plan["projected_training"]["training_images"] == 100 * 500 * 2 * 15 * 12
    assert 10 < plan["projected_training"]["hours"] / 24 < 12
    assert "days" in capsys.readouterr().err
    tiny = run_plan(bml_args(), world_size=1)
    assert not any("days" in warning for warning in tiny["warnings"])


# 7. progress off a terminal: a line per tenth
def test_progress_off_a_terminal_prints_a_line_per_tenth(capsys):
    assert list(progress(range(37), "embedding", unit="batch")) == list(range(37))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "embedding: 10% (4/37)" and lines[-1] == "embedding: 100% (37/37)"
    assert len(lines) == 10
    list(progress(range(3), "scoring"))
    assert len(capsys.readouterr().err.splitlines()) == 3


# 10. a SLURM job array of an experiment's command lines
def test_slurm_array_runs_the_line_of_its_task(tmp_path):
    commands = tmp_path / "commands.txt"
    commands.write_text("# seeds\necho first > {out}/1\n\necho second > {out}/2\necho third > {out}/3\n"
                        .format(out=tmp_path))
    script = ROOT / "scripts" / "slurm_array.sh"
    env = {**subprocess_env(), "SLURM_ARRAY_TASK_ID": "2"}
    subprocess.run(["bash", str(script), str(commands)], env=env, check=True, capture_output=True)
    assert (tmp_path / "2").read_text() == "second\n" and not (tmp_path / "1").exists()
    count = subprocess.run(["bash", str(script), "--count", str(commands)], env=subprocess_env(), check=True,
                           capture_output=True, text=True).stdout
    assert count.strip() == "3"
    missing = subprocess.run(["bash", str(script), str(commands)], env={**env, "SLURM_ARRAY_TASK_ID": "4"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "3 command lines" in missing.stderr


# 10. two "nodes": two torchrun agents on 127.0.0.1, Gloo, c10d rendezvous
STEP_HELPER = """
import os, sys, torch, train_bml
from bml.training.driver import build_components
from bml.training.engine import forward_backward
from bml.training.settings import finish_settings, loss_settings, record_training_data
from bml.utils import distributed
args = train_bml.get_args_parser().parse_args(sys.argv[2:])
context = distributed.init_distributed_mode("cpu") if "RANK" in os.environ else distributed.DistributedContext(
    rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
finish_settings(args, context)
record_training_data(args, 64)
torch.manual_seed(0)
parts = build_components(args, context, train_images=3840)
generator = torch.Generator().manual_seed(1)
images = torch.randn(2, 25, 3, 32, 32, generator=generator)   # the step's two episodes
labels = torch.randint(0, 64, (2, 25), generator=generator)
share = slice(context.rank * args.episodes_per_process, (context.rank + 1) * args.episodes_per_process)
forward_backward(parts, images[share], labels[share], loss_settings(args, 1), 0)
torch.save({name: p.grad for name, p in parts.model.named_parameters()}, f"{sys.argv[1]}/grad{context.rank}.pt")
distributed.cleanup()
"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_compute_the_gradient_of_one_process_with_the_same_episodes(tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1, Gloo), one episode each, against one process
    running both episodes of the step: the averaged gradients agree (no dropout: the same numbers either way)."""
    helper = tmp_path / "step_helper.py"
    helper.write_text(STEP_HELPER)
    flags = [*TINY, "--episodes_per_step", "2", "--drop_rate", "0"]
    endpoint = f"127.0.0.1:{free_port()}"
    agent = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes"]
    (tmp_path / "nodes").mkdir()
    (tmp_path / "single").mkdir()
    nodes = [subprocess.Popen([*agent, "--node_rank", str(node), str(helper), str(tmp_path / "nodes"), *flags],
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    single = subprocess.run([sys.executable, str(helper), str(tmp_path / "single"), *flags], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(outputs)
    assert single.returncode == 0, single.stdout + single.stderr
    expected = torch.load(tmp_path / "single" / "grad0.pt")
    for rank in (0, 1):
        gradients = torch.load(tmp_path / "nodes" / f"grad{rank}.pt")
        assert all(torch.allclose(gradients[name], expected[name], rtol=1e-4, atol=1e-6) for name in expected)


def test_resume_command_of_a_multi_node_run(monkeypatch):
    from bml.training.run_folder import launcher_command

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launcher_command(4)[:3] == ["torchrun", "--nnodes=2", "--nproc_per_node=2"]
    assert launcher_command(2) == ["torchrun", "--standalone", "--nproc_per_node=2"]
    assert launcher_command(1) == ["python"]
