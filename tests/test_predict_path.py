"""The prediction path as a new user meets it: calibration applied to another task, loader workers sized
from the CPUs, the launcher's help, a missing checkpoint's error, contact-sheet labels, the sheet script's
output, and the run lock on a platform without fcntl (Windows)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib.axes
import pytest
import torch
from PIL import Image

from bml import evaluate, launch
from bml.classifier import CalibrationWarning, FewShotClassifier
from bml.contact_sheet import SheetQuery, draw_contact_sheet, short_labels
from bml.models import BML
from bml.predict import get_args_parser, main
from fixtures import make_pickle_split_dataset, save_released_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (20, 40, 230), "grey": (128, 128, 128), "red": (230, 30, 20)}
TINY = dict(model="bml", backbone="resnet12", width=0.125, num_classes=4, dataset="CIFAR-FS", image_size=32,
            transform="O")
CALIBRATED_ON_5_WAY_1_SHOT = {"temperatures": {"bml": 3.0},
                              "fitted_on": {"split": "val", "way": 5, "shot": 1, "query": 15, "episodes": 10,
                                            "seed": 0}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random BML whose checkpoint holds temperatures fitted on 5-way 1-shot val episodes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "calibrated.pth"
    save_released_checkpoint(path, BML(num_classes=4, width=0.125), **TINY)
    torch.save({**torch.load(path, weights_only=False), "calibration": CALIBRATED_ON_5_WAY_1_SHOT}, path)
    return path


def make_folders(root: Path, shots: dict[str, int]) -> tuple[Path, Path]:
    """support/<class>/ with `shots` one-colour images each, and one query image per class."""
    for name, count in shots.items():
        for shot in range(count + 1):
            folder = root / ("support" if shot < count else "query") / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + 3 * shot, 24), COLOURS[name]).save(folder / f"{shot}.png")
    return root / "support", root / "query"


def run_predict(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(get_args_parser().parse_args([*argv, "--device", "cpu", "--no_progress"]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# 6. A temperature fitted on one task shape, applied to another

def test_fitting_another_task_than_the_temperatures_warns_and_a_matching_one_does_not(checkpoint):
    classifier = FewShotClassifier.from_checkpoint(checkpoint, device="cpu", progress=False)
    assert classifier.temperature == 3.0 and classifier.calibrated_on["shot"] == 1
    images = torch.randn(15, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(CalibrationWarning, match="fitted on 5-way 1-shot val episodes, but this task is 3-way "
                                                "5-shot") as caught:
        classifier.fit(images, [c for c in "abc" for _ in range(5)])
    assert "--n_ways 3 --n_shots 5" in str(caught[0].message)
    with pytest.warns(CalibrationWarning, match="this task is 5-way 1- to 5-shot"):
        classifier.fit(images[:9], list("aaaaabcde"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        classifier.fit(images[:5], list("abcde"))
    assert classifier.calibration_mismatch() is None


def test_predict_says_the_temperature_was_fitted_on_another_task(tmp_path, checkpoint, capsys):
    support, query = make_folders(tmp_path, {name: 5 for name in COLOURS})
    code, stdout, stderr = run_predict(capsys, "--ckp_path", str(checkpoint), "--support", str(support),
                                       "--query", str(query), "--out", str(tmp_path / "p.csv"))
    assert code == 0, stderr
    assert "confidences calibrated" not in stdout
    assert stderr.count("fitted on 5-way 1-shot val episodes, but this task is 3-way 5-shot") == 1
    assert f"eval_bml.py --ckp_path {checkpoint} --calibrate --n_ways 3 --n_shots 5" in stderr


# 8. Loader workers, the launcher's help, a missing checkpoint, contact-sheet labels, the sheet script

def test_evaluation_and_prediction_size_their_loader_workers_from_the_cpus(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("bml.datasets.sampler.available_cpus", lambda: 2)
    workers = []
    original = torch.utils.data.DataLoader.__init__

    def record(self, *args, **kwargs):
        workers.append(kwargs.get("num_workers", 0))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", record)
    support, query = make_folders(tmp_path, {name: 1 for name in COLOURS})
    code, _, stderr = run_predict(capsys, "--ckp_path", str(checkpoint), "--support", str(support),
                                  "--query", str(query), "--out", str(tmp_path / "p.csv"))
    assert code == 0, stderr
    data_root = make_pickle_split_dataset(tmp_path / "data", "CIFAR-FS", classes=(4, 3, 3), images_per_class=4,
                                          image_size=32)
    args = evaluate.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--n_ways", "3", "--n_shots", "1",
         "--n_queries", "3", "--episodes", "4", "--seeds", "0", "--output_dir", str(tmp_path), "--no_progress"])
    assert evaluate.main(args) == 0, capsys.readouterr().err
    assert workers and set(workers) == {1}   # 2 CPUs: one for this process, one for a loader worker


def test_launcher_help_is_a_help(capsys):
    with pytest.raises(SystemExit) as stop:
        launch.main(["--help"])
    assert stop.value.code == 0
    output = capsys.readouterr().out
    assert output.startswith("usage: python -m bml.launch") and "train_bml.py" in output and "--dry_run" in output
    with pytest.raises(SystemExit) as stop:
        launch.main(["no_such_script.py"])
    assert stop.value.code == 2 and "no training script no_such_script.py" in capsys.readouterr().err


def test_a_missing_checkpoint_points_to_the_released_weights(tmp_path, capsys):
    missing = tmp_path / "miniImageNet.pth"
    support, query = make_folders(tmp_path, {"red": 1, "blue": 1})
    code, _, stderr = run_predict(capsys, "--ckp_path", str(missing), "--support", str(support), "--query",
                                  str(query), "--out", str(tmp_path / "p.csv"))
    assert code == 1
    args = evaluate.get_args_parser().parse_args(["--ckp_path", str(missing), "--dataset", "CIFAR-FS",
                                                  "--output_dir", str(tmp_path), "--no_progress"])
    assert evaluate.main(args) == 1
    for error in (stderr, capsys.readouterr().err):
        assert f"checkpoint not found: {missing}" in error
        assert "'Released weights' section" in error and "pretrained_weights/" in error


def test_contact_sheet_labels_tell_classes_with_a_common_prefix_apart(tmp_path, monkeypatch):
    names = [f"greek_character{n:02d}" for n in range(1, 6)]
    labels = short_labels([*names, "cat", "unknown"])
    assert len(set(labels.values())) == 7 and labels["cat"] == "cat"
    assert all(len(labels[name]) <= 14 and labels[name].endswith(name[-2:]) and "…" in labels[name]
               for name in names)

    drawn = []
    original = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, text, *args, **kwargs: (drawn.append(text), original(self, text, *args, **kwargs)))
    image = tmp_path / "glyph.png"
    Image.new("RGB", (16, 16), (10, 10, 10)).save(image)
    draw_contact_sheet(tmp_path / "sheet.png", {name: [image] for name in names},
                       [SheetQuery(image, names[0], 0.9, names[1])], columns=2)
    assert len({text.split("\n")[0] for text in drawn}) == 5


def test_the_sheet_script_writes_where_asked_and_never_over_a_tracked_picture(tmp_path):
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.txt"}\n')
    stub.chmod(0o755)
    environment = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    for output in ([], ["sheets/mine.png"]):
        (tmp_path / "calls.txt").unlink(missing_ok=True)
        completed = subprocess.run(["bash", str(ROOT / "docs" / "make_contact_sheet.sh"), "best.pth", *output],
                                   cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, completed.stderr
        predict_call = (tmp_path / "calls.txt").read_text().splitlines()[-1].split()
        sheet = Path(predict_call[predict_call.index("--sheet") + 1])
        assert predict_call[predict_call.index("--ckp_path") + 1] == str(tmp_path / "best.pth")
        assert sheet == tmp_path / (output[0] if output else "contact_sheet.png")
        assert not (sheet.is_relative_to(ROOT) and sheet.relative_to(ROOT).as_posix() in tracked)


# 9. The run lock without fcntl (Windows has none)

def test_the_classifier_imports_and_the_run_lock_holds_without_fcntl(tmp_path):
    program = ("import os, sys\n"
               "sys.modules['fcntl'] = None\n"
               "from bml import FewShotClassifier\n"
               "import bml.classifier\n"
               "from bml.utils.io import OutputError, folder_lock\n"
               "print(os.getpid())\n"
               "with folder_lock(sys.argv[1]):\n"
               "    try:\n"
               "        with folder_lock(sys.argv[1]):\n"
               "            print('taken twice')\n"
               "    except OutputError as error:\n"
               "        print(error)\n"
               "with folder_lock(sys.argv[1]):\n"
               "    print('taken again once released')\n")
    completed = subprocess.run([sys.executable, "-c", program, str(tmp_path)], capture_output=True, text=True,
                               timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr
    pid, busy, *rest = completed.stdout.splitlines()
    assert busy.startswith(f"another run (process {pid}) is writing to {tmp_path}")
    assert rest == ["taken again once released"]
