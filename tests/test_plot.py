"""`python -m bml.plot` and the curves.png that training writes, on real (tiny) run folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bml.plot
import train_bml
from bml.plot import CURVES, STEP_LOG, PlotError, get_args_parser, main, plot_runs, read_run
from test_training import bml_args


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A 2-epoch run of 2 steps an epoch, validated after the last."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_bml.main(bml_args(folder, "--epochs", "2", "--episodes_per_epoch", "2", "--eval_freq", "2")) == 0
    torch.set_num_threads(threads)
    return folder


def drawn_pixels(path) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("L"))
    return image[image < 250]   # not the white background


def test_training_writes_step_points_and_curves(run_folder):
    run = read_run(run_folder)
    assert [entry["epoch"] for entry in run.epochs] == [1, 2]   # log.txt keeps one line per epoch
    assert [entry["epoch"] for entry in run.steps] == [0.5, 1.0, 1.5, 2.0]
    assert {"train_total", "train_global", "train_local", "train_mutual", "lr", "train_images_per_s"} <= set(
        run.steps[0])
    # A step point is the mean over its steps: the epoch's mean is the mean of its points.
    first_epoch = [entry["train_total"] for entry in run.steps[:2]]
    assert np.mean(first_epoch) == pytest.approx(run.epochs[0]["train_total"], rel=1e-6)
    assert "val_acc" in run.epochs[-1] and "val_acc_local" in run.epochs[-1]
    curves = run_folder / CURVES
    assert curves.is_file() and Image.open(curves).size[0] > 800 and drawn_pixels(curves).size > 10_000


def test_plot_command_overlays_runs_and_reads_older_logs(run_folder, tmp_path, capsys):
    older = tmp_path / "older"   # a run from before log_steps.txt: epoch points only
    older.mkdir()
    (older / "log.txt").write_text((run_folder / "log.txt").read_text())
    output = tmp_path / "both.png"
    args = get_args_parser().parse_args([str(run_folder), str(older), "-o", str(output), "--labels", "new", "old"])
    assert main(args) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    assert drawn_pixels(output).size > drawn_pixels(run_folder / CURVES).size * 0.5
    assert read_run(older).steps == [] and not (older / STEP_LOG).exists()


def test_plot_errors_name_the_folder(tmp_path, capsys):
    assert main(get_args_parser().parse_args([str(tmp_path / "nothing")])) == 1
    assert f"no log.txt in {tmp_path / 'nothing'}" in capsys.readouterr().err
    (tmp_path / "log.txt").write_text("")
    with pytest.raises(PlotError, match="empty"):
        plot_runs([tmp_path], tmp_path / CURVES)
    with pytest.raises(PlotError, match="2 labels for 1 runs"):
        plot_runs([tmp_path], tmp_path / CURVES, labels=["a", "b"])


def test_a_plotting_failure_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(bml.plot, "plot_runs", broken)
    folder = tmp_path / "run"
    assert train_bml.main(bml_args(folder, "--epochs", "1", "--episodes_per_epoch", "1", "--eval_freq", "0")) == 0
    assert "could not draw the training curves (RuntimeError: no fonts)" in capsys.readouterr().err
    assert (folder / "last.pth").is_file() and not (folder / CURVES).exists()
    assert json.loads((folder / "log.txt").read_text())["epoch"] == 1
