"""Reliability, the second attack: nothing lost, nothing silent, nothing hung (see docs/RELIABILITY.md, section
"Second attack", which names the test of each guarantee). Full disks are real small tmpfs mounts where this
machine allows mounting one (a mocked variant always runs); kills are real signals."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_bml
from bml import contact_sheet, plot
from bml.checkpoint import read_checkpoint, save_checkpoint
from bml.contact_sheet import SheetQuery, draw_contact_sheet
from bml.datasets import DatasetError, build_dataset, glyphs
from bml.evaluation import cache, write_results
from bml.evaluation.results import CheckpointIdentity, ResultsPaths, parse_seed_range
from bml.training import driver
from bml.utils import distributed
from bml.utils.io import OutputError
from fixtures import make_image_folder
from test_predict import checkpoint, make_queries_by_class, make_support, run_cli  # noqa: F401  (checkpoint: a fixture)
from test_reliability import (ROOT, checkpoint_path, edit_checkpoint, eval_args, finished_run,  # noqa: F401  (fixtures)
                              no_training, train, trained_run)
from test_training import on_losses_call, one_thread, send_sigterm  # noqa: F401  (fixtures used here too)


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO) fails the test after 60 s instead of hanging the suite."""
    def timeout(signum, frame):
        raise TimeoutError("blocked: the file was opened without checking what it is")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def mount_tmpfs(folder: Path, options: str) -> None:
    """A real small file system at `folder` (skips the test where this machine does not allow mounting one)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """`folder` as a tmpfs mounted with `options` while the block runs (skips the test where it cannot mount)."""
    mount_tmpfs(folder, options)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: the real ENOSPC of a disk that fills part-way through a write."""
    with mounted_tmpfs(tmp_path / "small_disk", "size=1m") as folder:
        yield folder


@pytest.fixture
def read_only_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "read_only", "ro,size=1m") as folder:
        yield folder


def fill(folder: Path) -> None:
    """Fill the file system of `folder` to its last byte."""
    with open(folder / "filler", "wb") as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()


# ----------------------------------------------------------------------------------------------
# 1. Files of a run are never written through links the project did not make


@pytest.mark.parametrize("name", [".lock", "config.json", "log_steps.txt", "log.txt", "messages.txt", "last.pth"])
def test_run_files_are_never_written_through_links(tmp_path, capsys, name):
    target = tmp_path / "precious.txt"
    target.write_text("the user's own file\n")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / name).symlink_to(target)
    assert train(folder, "--is_continue") == 1
    assert "is a link" in capsys.readouterr().err
    assert target.read_text() == "the user's own file\n"


def test_only_the_projects_own_temporary_files_are_removed(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    users = [folder / ".notes.tmp", folder / ".last.pth.mine.tmp", folder / ".photo.jpg.abcd1234.tmp"]
    for path in users:
        path.write_text("mine")
    orphan = folder / ".config.json.k2j4h5g6.tmp"   # atomic_write's name for a killed write of config.json
    orphan.write_text("{")
    assert train(folder) == 0
    assert all(path.read_text() == "mine" for path in users) and not orphan.exists()


# ----------------------------------------------------------------------------------------------
# 2. Outputs never land on inputs


@pytest.fixture
def evaluation_refused(monkeypatch):
    """Embedding fails the test: what must be checked before it is."""
    monkeypatch.setattr(importlib.import_module("bml.evaluate"), "evaluate_heads",
                        lambda *a, **k: pytest.fail("evaluated"))


@pytest.mark.parametrize("json_target", ["checkpoint", "results file"])
def test_eval_refuses_an_output_that_is_an_input(tmp_path, checkpoint_path, capsys, evaluation_refused, json_target):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "best.pth"
    ckpt.write_bytes(checkpoint_path.read_bytes())
    out = tmp_path / "out"
    results = out / "glyphs_val_bml_eval_results_1shot.txt"
    out.mkdir()
    results.write_text("an earlier result\n")
    target = ckpt if json_target == "checkpoint" else results
    before = target.read_bytes()
    assert eval_bml.main(eval_args(ckpt, out, "--json", str(target))) == 1
    error = capsys.readouterr().err
    refusal = "input of this command" if json_target == "checkpoint" else "holds the results of another checkpoint"
    assert "--json" in error and refusal in error
    assert target.read_bytes() == before


@pytest.mark.parametrize("flag, target", [("--out", "checkpoint"), ("--sheet", "checkpoint"), ("--out", "query"),
                                          ("--sheet", "query"), ("--out", "support"), ("--sheet", "support"),
                                          ("--sheet", "query file")])
def test_predict_refuses_an_output_that_is_an_input(tmp_path, checkpoint, capsys, flag, target):
    support, queries = make_support(tmp_path / "support"), make_queries_by_class(tmp_path / "queries")
    query = "query file" == target
    paths = {"checkpoint": checkpoint, "query": queries / "red" / "q0.png", "support": support / "red" / "s0.png",
             "query file": queries / "grey" / "q1.png"}
    path = paths[target]
    before = path.read_bytes()
    others = {"--out": str(tmp_path / "p.csv"), "--sheet": str(tmp_path / "s.png")}
    others[flag] = str(path)
    code, _, error = run_cli(capsys, "--ckp_path", str(checkpoint), "--support", str(support), "--query",
                             str(path if query else queries), "--out", others["--out"], "--sheet", others["--sheet"])
    assert code == 1 and flag in error and "input of this command" in error
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------------------------
# 3. A run's records are its own; a results pair is one unit; a signal is never swallowed


def test_a_fresh_run_never_mixes_its_records_with_a_killed_one(tmp_path):
    folder = tmp_path / "run"
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "log_steps.txt").write_text(json.dumps({"epoch": 0.5, "train_total": 99.0, "killed": True}) + "\n")
    old_events = folder / "tensorboard" / "events.out.tfevents.1.killed"
    old_events.write_bytes(b"old")
    assert train(folder) == 0   # no checkpoint there: a fresh run
    steps = [json.loads(line) for line in (folder / "log_steps.txt").read_text().splitlines()]
    assert steps and not any("killed" in entry for entry in steps)
    assert not old_events.exists() and list((folder / "tensorboard").glob("events.out.tfevents.*"))


def results_of(accuracy: float) -> dict:
    return {"bml": {"acc": accuracy, "ci95": 0.1, "per_seed": {0: {"acc": accuracy}}}}


def test_a_results_file_and_its_json_are_written_as_one_unit(tmp_path, monkeypatch):
    """A second evaluation writes the same pair while the first is between its two files: both files end up the
    same evaluation's."""
    original, second = os.replace, {}
    paths = ResultsPaths(tmp_path / "glyphs_bml_eval_results_1shot.txt", tmp_path / "glyphs_bml_eval_results_1shot.json",
                         None)
    first_checkpoint, second_checkpoint = (CheckpointIdentity(name, name * 8, 1) for name in ("first.pth", "second.pth"))

    def replace(source, destination):
        original(source, destination)
        if not second and str(destination).endswith(".txt"):   # the first's text file is in place, not its JSON
            second["thread"] = threading.Thread(target=write_results, args=(
                results_of(47.93), "glyphs", paths, second_checkpoint))
            second["thread"].start()
            second["thread"].join(timeout=5)   # finishes at once without a lock; waits for the first with one

    monkeypatch.setattr(os, "replace", replace)
    text, json_path, _ = write_results(results_of(44.0), "glyphs", paths, first_checkpoint)
    second["thread"].join()
    written = json.loads(json_path.read_text())
    accuracy = float(text.read_text().splitlines()[-1].rsplit(" ", 1)[1])
    assert accuracy == written["results"]["bml"]["acc"]
    assert {44.0: "first.pth", 47.93: "second.pth"}[accuracy] == written["checkpoint"]


def test_sigterm_during_the_last_validation_exits_143_after_saving(tmp_path, capsys, monkeypatch):
    def terminated_validation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return {"acc": 50.0, "ci95": 1.0}

    monkeypatch.setattr(driver, "validate", terminated_validation)
    assert train(tmp_path / "run", "--eval_freq", "1") == 128 + signal.SIGTERM
    assert "--is_continue" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 1


# ----------------------------------------------------------------------------------------------
# 9. Nothing hangs: FIFOs, a rendezvous without its other processes, a sheet of many classes


def test_a_fifo_among_the_images_of_a_data_set_is_named(tmp_path, no_hang):
    make_image_folder(tmp_path, "mine", images_per_class=3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "mine" / "train" / "class_0" / "z.jpg").symlink_to(fifo)
    with pytest.raises(DatasetError, match="FIFO"):
        build_dataset("mine", "train", data_root=tmp_path, image_size=16)


@pytest.mark.parametrize("role", ["--query", "--ckp_path", "--out"])
def test_predict_refuses_a_fifo_before_opening_it(tmp_path, checkpoint, capsys, no_hang, role):
    support, queries = make_support(tmp_path / "support"), make_queries_by_class(tmp_path / "queries")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    paths = {"--query": str(queries), "--ckp_path": str(checkpoint), "--out": str(tmp_path / "p.csv"), role: str(fifo)}
    code, _, error = run_cli(capsys, "--support", str(support), *[part for flag in paths for part in (flag, paths[flag])])
    assert code == 1 and "FIFO" in error


def test_a_fifo_as_the_glyphs_cache_is_rebuilt_not_read(tmp_path, capsys, no_hang):
    os.mkfifo(tmp_path / "glyphs.npz")
    assert glyphs.read_cache(tmp_path / "glyphs.npz") is None
    assert "FIFO" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rendezvous_without_its_other_processes_says_so_and_stops(tmp_path):
    script = ("import datetime, sys\nfrom bml.utils import distributed\n"
              "distributed.FIRST_CONTACT_TIMEOUT = datetime.timedelta(seconds=2)\n"
              "try:\n    distributed.init_distributed_mode('cpu')\n"
              "except distributed.DeviceError as problem:\n    print('ERROR', problem)\n    sys.exit(1)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    env.pop("TORCHELASTIC_RUN_ID", None)
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the rendezvous waited silently")
    assert result.returncode == 1
    assert "waiting up to 2 s" in result.stdout and "did not join" in result.stdout and "torchrun" in result.stdout


def test_a_sheet_of_many_support_classes_caps_its_rows(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(contact_sheet, "_show", lambda ax, path: drawn.append(path))
    support = {f"class_{c:03d}": [tmp_path / f"s{c}.png"] for c in range(40)}
    queries = [SheetQuery(tmp_path / "q.png", "class_000", 0.9)]
    draw_contact_sheet(tmp_path / "sheet.png", support, queries, columns=1)
    support_drawn = [path for path in drawn if path.name.startswith("s")]
    assert len(support_drawn) == contact_sheet.MAX_SUPPORT_ROWS < 40
    assert support_drawn[0].name == "s0.png" and support_drawn[-1].name == "s39.png"   # evenly spaced, ends kept


# ----------------------------------------------------------------------------------------------
# 10. A memory-mapped cache reserves its space: "no space left on device", never SIGBUS


def test_a_memory_mapped_cache_without_room_is_refused_when_created(tmp_path, monkeypatch):
    def full(descriptor, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="no space left on device"):
        cache.allocate_cache(1000, [256], torch.float32, max_memory_gb=1e-9, cache_dir=str(tmp_path))


def test_a_memory_mapped_cache_on_a_disk_that_filled_is_refused_when_created(small_disk, monkeypatch):
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda folder: argparse.Namespace(free=2**40))   # filled since
    with pytest.raises(OutputError, match="no space left on device.*--cache_dir"):
        cache.allocate_cache(1000, [1000], torch.float32, max_memory_gb=1e-9, cache_dir=str(small_disk))


# ----------------------------------------------------------------------------------------------
# 11. One-line errors, never tracebacks


def torch_zip_writer_fails(monkeypatch) -> None:
    """torch.save into a file fails as torch's zip writer reports a disk that filled part-way."""
    original = torch.save

    def save(obj, file, *args, **kwargs):
        if hasattr(file, "name"):   # a real file, not the size counter
            file.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1088 vs 1024")
        return original(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_checkpoint_save_that_torch_reports_failed_is_a_full_disk(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pth", {"model": {}, "epoch": 1})
    torch_zip_writer_fails(monkeypatch)
    with pytest.raises(OutputError, match="no space left on device"):
        save_checkpoint(tmp_path / "last.pth", {"model": {}, "epoch": 2})
    assert read_checkpoint(tmp_path / "last.pth")["epoch"] == 1 and not list(tmp_path.glob(".*.tmp"))


def test_a_checkpoint_on_a_real_disk_that_fills_part_way(small_disk):
    save_checkpoint(small_disk / "last.pth", {"model": {"w": torch.zeros(10)}, "epoch": 1})
    with pytest.raises(OutputError, match="no space left on device"):
        save_checkpoint(small_disk / "last.pth", {"model": {"w": torch.zeros(2**19)}, "epoch": 2})   # 2 MiB
    assert read_checkpoint(small_disk / "last.pth")["epoch"] == 1 and not list(small_disk.glob(".*.tmp"))


def test_sigterm_when_torch_cannot_write_the_checkpoint_exits_143_with_the_resume_command(tmp_path, capsys,
                                                                                           monkeypatch, on_losses_call):
    on_losses_call(1, send_sigterm)
    torch_zip_writer_fails(monkeypatch)
    assert train(tmp_path / "run", "--episodes_per_epoch", "3") == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "no space left on device" in captured.err and "--is_continue" in captured.out


@pytest.mark.parametrize("output", ["--out", "--sheet"])
def test_predict_on_a_full_disk_is_one_line(tmp_path, checkpoint, capsys, small_disk, output):
    support, queries = make_support(tmp_path / "support"), make_queries_by_class(tmp_path / "queries")
    paths = {"--out": str(tmp_path / "p.csv"), "--sheet": str(tmp_path / "s.png"),
             output: str(small_disk / ("p.csv" if output == "--out" else "s.png"))}
    fill(small_disk)
    code, _, error = run_cli(capsys, "--ckp_path", str(checkpoint), "--support", str(support), "--query",
                             str(queries), *[part for flag in paths for part in (flag, paths[flag])])
    assert code == 1 and "no space left on device" in error


@pytest.mark.parametrize("log, message", [
    ("[1, 2]\n", "line 1"), ('{"train_total": 1.0}\n', "numeric 'epoch'"), ('{"epoch": "one"}\n', "numeric 'epoch'"),
    ('{"epoch": 1}\nnot json\n', "line 2"), (b"\x80\x81\xfe\xff binary", "not a text file"),
])
def test_plot_reports_a_malformed_log_in_one_line(tmp_path, capsys, log, message):
    (tmp_path / "log.txt").write_bytes(log if isinstance(log, bytes) else log.encode())
    assert plot.main(plot.get_args_parser().parse_args([str(tmp_path)])) == 1
    assert message in capsys.readouterr().err


def test_plot_refuses_an_unknown_image_format_before_drawing(tmp_path, capsys):
    (tmp_path / "log.txt").write_text('{"epoch": 1, "train_total": 1.0}\n')
    assert plot.main(plot.get_args_parser().parse_args([str(tmp_path), "-o", str(tmp_path / "curves.xyz")])) == 1
    assert ".png" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(config="not settings"), "'config'"),
    (lambda c: c.update(rng="junk"), "'rng'"),
    (lambda c: c.update(rng=[{"torch": "junk"}]), "'rng'"),
    (lambda c: c.update(optimizer="junk"), "optimiser state"),
    (lambda c: c.update(dropblock_step="many"), "'dropblock_step'"),
    (lambda c: c.update(step=-5), "'step'"),
])
def test_malformed_fields_of_a_training_checkpoint_are_messages(trained_run, capsys, edit, message):
    edit_checkpoint(trained_run / "last.pth", edit)
    assert train(trained_run, "--epochs", "3", "--is_continue") == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


@pytest.mark.parametrize("field, value", [("width", "wide"), ("image_size", "big"), ("backbone", 5),
                                          ("num_classes", "many"), ("width", [1.0])])
def test_malformed_model_config_of_a_checkpoint_is_a_message(tmp_path, checkpoint_path, capsys, field, value):
    path = tmp_path / "edited.pth"
    state = read_checkpoint(checkpoint_path)
    setattr(state["config"], field, value)
    torch.save(state, path)
    assert eval_bml.main(eval_args(path, tmp_path / "out")) == 1
    assert field in capsys.readouterr().err


@pytest.mark.parametrize("environment, message", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc'"), ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 WORLD_SIZE=1"),
])
def test_malformed_launcher_variables_are_messages(tmp_path, capsys, monkeypatch, no_training, environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert train(tmp_path / "run") == 1
    error = capsys.readouterr().err
    assert message in error and "torchrun" in error


@pytest.mark.parametrize("device", ["bogus", "mps", "meta"])
def test_devices_this_project_cannot_run_on_are_messages(tmp_path, capsys, no_training, device):
    assert train(tmp_path / "run", "--device", device) == 1
    assert f"--device {device}" in capsys.readouterr().err.replace("'", "")


@pytest.mark.parametrize("flags, message", [
    (["--width", "100"], "--width"), (["--image_size", "100000"], "--image_size"),
    (["--val_episodes", "1000000000", "--eval_freq", "1"], "--val_episodes"),
])
def test_flags_whose_memory_the_machine_cannot_hold_are_refused_before_allocating(tmp_path, capsys, no_training,
                                                                                  flags, message):
    assert train(tmp_path / "run", *flags) == 1
    error = capsys.readouterr().err
    assert message in error and "GB" in error and not (tmp_path / "run").exists()


def test_seeds_beyond_what_memory_holds_are_refused_when_parsed():
    with pytest.raises(argparse.ArgumentTypeError, match="at most"):
        parse_seed_range("0-100000000")
    assert parse_seed_range("0-9") == list(range(10))


def test_a_cache_folder_that_is_a_file_is_refused_before_embedding(tmp_path, checkpoint_path, capsys,
                                                                   evaluation_refused):
    (tmp_path / "cache").write_text("a file")
    assert eval_bml.main(eval_args(checkpoint_path, tmp_path / "out", "--head", "cl2n", "--cache_dir",
                                   str(tmp_path / "cache"))) == 1
    assert "--cache_dir" in capsys.readouterr().err


@pytest.mark.parametrize("cache_folder", ["file", "read-only"])
def test_the_embedded_data_set_is_used_from_memory_when_its_cache_folder_is_unwritable(tmp_path, capsys, monkeypatch,
                                                                                        request, cache_folder):
    if cache_folder == "file":
        folder = tmp_path / "cache"
        folder.write_text("a file")
    else:
        folder = request.getfixturevalue("read_only_disk")
    monkeypatch.setenv("BML_CACHE_DIR", str(folder))
    rendered = {"images": np.zeros((4, 8, 8), np.uint8), "labels": np.arange(4), "characters": np.array(list("abcd")),
                "class_split": np.array(["train"] * 4)}
    monkeypatch.setattr(glyphs, "build_glyphs", lambda: rendered)
    assert glyphs.load_glyphs() is rendered
    assert "from memory" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--n_train_ways", "100"], ["--n_train_shots", "100"]])
def test_training_episodes_the_split_cannot_hold_are_refused_before_the_folder_is_claimed(tmp_path, capsys,
                                                                                          no_training, flags):
    assert train(tmp_path / "run", *flags) == 1
    error = capsys.readouterr().err
    assert "training episodes" in error and flags[0] in error and not (tmp_path / "run").exists()
