"""Reliability: no crafted file runs code or corrupts memory, no wrong result is reported, no run or result
is lost (see docs/RELIABILITY.md, which names the test of each guarantee)."""
from __future__ import annotations

import argparse
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bml.evaluate
import eval_bml
import train_baseline
import train_bml
from bml import predict
from bml.training import driver, guard, signals
from bml.checkpoint import CheckpointError, check_state_dict, read_checkpoint, save_checkpoint
from bml.datasets import DatasetError, build_dataset, read_npz_arrays
from bml.datasets.sampler import build_step_loader
from bml.evaluation import EmbeddingOptions, EvaluationError, evaluate_episodes
from bml.evaluation.cache import embed_dataset
from bml.models import BML
from bml.scoring import COMBINED
from bml.utils.io import OutputError, folder_lock
from fixtures import make_image_folder, make_tiered
from test_training import epoch_log, on_losses_call, one_thread, send_sigterm  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# 1. A crafted .npz never reaches memory


def npz_with_member(path, key: str, header_dtype: str, payload: bytes, shape=(2, 4, 4, 3)) -> None:
    """An .npz whose member `key` declares `header_dtype` and holds `payload` after the header."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": header_dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{key}.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + payload)


@pytest.mark.parametrize("header_dtype", ["|O", "<f4", "|V8", "|S1"])
def test_npz_refuses_non_integer_dtypes_before_allocating(tmp_path, header_dtype):
    path = tmp_path / "crafted.npz"
    npz_with_member(path, "images", header_dtype, b"\xef\xbe\xad\xde" * 256)   # pointer-like bytes
    with pytest.raises(DatasetError, match="only integer arrays"):
        read_npz_arrays([(path, "images")])


def test_tiered_with_object_images_is_a_dataset_error(tmp_path):
    make_tiered(tmp_path)
    images = np.empty(12, dtype=object)
    images[:] = [np.zeros((8, 8, 3), np.uint8)] * 12
    np.savez(tmp_path / "tieredImageNet" / "test_images.npz", images=images)   # an ordinary object-dtype savez
    with pytest.raises(DatasetError, match="stored as object"):
        build_dataset("tieredImageNet", "test", data_root=tmp_path)


def test_npz_of_integers_other_than_uint8_is_refused_for_images(tmp_path):
    np.savez(tmp_path / "wide.npz", images=np.zeros((2, 4, 4, 3), np.int64))
    with pytest.raises(DatasetError, match="stored as int64, expected uint8"):
        read_npz_arrays([(tmp_path / "wide.npz", "images")])


# ----------------------------------------------------------------------------------------------
# 3. Every numeric flag is validated when parsed, with the allowed range in the message


TRAIN_FLAGS = [("--width", "0", "> 0"), ("--image_size", "0", ">= 16"), ("--image_size", "1", ">= 16"),
               ("--image_size", "8", ">= 16"), ("--image_size", "-5", ">= 16"), ("--lr", "-1", ">= 0"),
               ("--drop_rate", "2", ">= 0 and < 1"), ("--num_workers", "-1", ">= 0"), ("--T", "0", "> 0"),
               ("--weights", "nan_1_1", "three numbers >= 0"), ("--n_train_queries", "0", ">= 1"),
               ("--lr", "nan", ">= 0"), ("--epochs", "0", ">= 1"), ("--seed", "-3", ">= 0"),
               ("--clip_grad", "-1", ">= 0"), ("--global_batch", "-1", ">= 0"), ("--n_ways", "1", ">= 2"),
               ("--episodes_per_step", "1.5", "an integer >= 1")]


@pytest.mark.parametrize("flag, value, allowed", TRAIN_FLAGS)
def test_train_flags_are_checked_when_parsed(flag, value, allowed, capsys):
    with pytest.raises(SystemExit):
        train_bml.get_args_parser().parse_args([flag, value])
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and allowed in error and repr(value) in error


EVAL = (eval_bml.get_args_parser, ["--ckp_path", "x"])
PREDICT = (predict.get_args_parser, ["--ckp_path", "x", "--support", "s", "--query", "q"])


@pytest.mark.parametrize("entry, flag, value, allowed", [
    ((train_baseline.get_args_parser, []), "--batch_size", "0", ">= 1"),
    (EVAL, "--n_queries", "0", ">= 1"), (EVAL, "--batch_size", "0", ">= 1"), (EVAL, "--image_size", "8", ">= 16"),
    (EVAL, "--max_memory_gb", "0", "> 0"), (PREDICT, "--num_workers", "-1", ">= 0"),
    (PREDICT, "--image_size", "0", ">= 16"),
])
def test_other_entry_points_check_their_flags(entry, flag, value, allowed, capsys):
    get_parser, required = entry
    with pytest.raises(SystemExit):
        get_parser().parse_args([*required, flag, value])
    assert allowed in capsys.readouterr().err


def test_valid_flags_still_parse():
    args = train_bml.get_args_parser().parse_args(["--lr", "0", "--weights", "2_1_0", "--drop_rate", "0",
                                                   "--image_size", "16", "--width", "0.125"])
    assert (args.lr, args.weights, args.drop_rate, args.image_size, args.width) == (0.0, "2_1_0", 0.0, 16, 0.125)


# ----------------------------------------------------------------------------------------------
# 2. No silent wrong accuracy: float16 never stores inf, non-finite scores are an error


class Points(torch.utils.data.Dataset):
    """5 classes x 8 points in 16 dimensions, each class near its own axis, times `scale`."""

    def __init__(self, scale: float):
        generator = torch.Generator().manual_seed(0)
        self.labels = np.repeat(np.arange(5), 8)
        self.points = (torch.eye(16)[:5][self.labels] + 0.3 * torch.rand(40, 16, generator=generator)) * scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.points[index], int(self.labels[index])


class Identity(torch.nn.Module):
    """Two 'views' that pass the points through (the second one doubled)."""

    view_names = ("global", "local")

    def embed(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return points, 2 * points


def evaluate_points(scale: float, storage_dtype: torch.dtype, report: dict | None = None) -> dict:
    return evaluate_episodes(Identity(), Points(scale), way=5, shot=1, query=3, episodes=20, seeds=[0],
                             options=EmbeddingOptions(storage_dtype=storage_dtype, progress=False), report=report)


def test_float16_cache_falls_back_to_float32_when_features_exceed_its_range(capsys):
    report: dict = {}
    large = evaluate_points(1e5, torch.float16, report)   # 1e5 > 65504: inf in float16
    reference = evaluate_points(1.0, torch.float32)
    assert {name: result["acc"] for name, result in large.items()} == \
        {name: result["acc"] for name, result in reference.items()}
    assert reference[COMBINED]["acc"] > 90
    assert report["storage"] == "float32" and "65504" in report["storage_note"]
    assert "float16 range" in capsys.readouterr().out
    report = {}
    evaluate_points(1.0, torch.float16, report)
    assert report == {"storage": "float16"}


def test_non_finite_scores_are_an_error_not_an_accuracy():
    with pytest.raises(EvaluationError, match="no accuracy is reported"):
        evaluate_points(1e19, torch.float32)   # finite embeddings, squared distances overflow float32


# ----------------------------------------------------------------------------------------------
# Training runs: tiny BML on the embedded glyphs set


TINY = ["--dataset", "glyphs", "--width", "0.125", "--image_size", "32", "--n_train_ways", "5",
        "--n_train_shots", "1", "--n_train_queries", "1", "--val_episodes", "5", "--num_workers", "0",
        "--print_freq", "1", "--episodes_per_epoch", "1", "--eval_freq", "0", "--epochs", "1"]


def train(folder: Path | None, *extra: str) -> int:
    save = ["--run_folder", str(folder)] if folder is not None else []
    return train_bml.main(train_bml.get_args_parser().parse_args([*TINY, *save, *extra]))


@pytest.fixture
def no_training(monkeypatch):
    """Training steps fail the test: what must be checked before them is."""
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(driver, "train_one_epoch", fail)


# 4. Check before the long work, not after it


@pytest.mark.parametrize("flags, message", [
    (["--eval_freq", "1", "--n_queries", "60"], "--n_queries"),           # 1 + 60 > 60 images per class
    (["--eval_freq", "1", "--n_ways", "17"], "--n_ways"),                # 16 val classes
])
def test_validation_settings_are_checked_before_training(tmp_path, capsys, no_training, flags, message):
    assert train(tmp_path / "run", *flags) == 1
    error = capsys.readouterr().err
    assert "validation episodes" in error and message in error


def test_save_folder_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "taken").write_text("not a folder")
    assert train(tmp_path / "taken") == 1
    assert "is a file, not a folder" in capsys.readouterr().err


def test_failing_validation_saves_the_epoch_first(tmp_path, capsys, monkeypatch):
    def diverged(*args, **kwargs):
        raise EvaluationError("the model produced non-finite embeddings")

    monkeypatch.setattr(driver, "evaluate", diverged)
    assert train(tmp_path / "run", "--eval_freq", "1", "--epochs", "2") == 1
    error = capsys.readouterr().err
    assert "validation after epoch 1 failed" in error and "--is_continue" in error and "Traceback" not in error
    assert read_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 1
    assert [line["epoch"] for line in epoch_log(tmp_path / "run")] == [1]


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory) -> Path:
    """A tiny BML checkpoint trained for one step on glyphs."""
    folder = tmp_path_factory.mktemp("trained")
    assert train(folder / "run") == 0
    return folder / "run" / "last.pth"


def eval_args(checkpoint: Path, out: Path, *extra: str) -> argparse.Namespace:
    return eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--split", "val", "--n_shots", "1", "--n_queries", "2", "--episodes", "5",
         "--seeds", "0", "--num_workers", "0", "--device", "cpu", "--output_dir", str(out), "--no_progress", *extra])


def test_eval_checks_its_outputs_before_embedding(tmp_path, checkpoint_path, capsys, monkeypatch):
    monkeypatch.setattr(bml.evaluate, "evaluate_heads", lambda *a, **k: pytest.fail("evaluated"))
    (tmp_path / "file").write_text("")
    assert eval_bml.main(eval_args(checkpoint_path, tmp_path / "file")) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "folder.json").mkdir()
    assert eval_bml.main(eval_args(checkpoint_path, tmp_path / "out", "--json", str(tmp_path / "folder.json"))) == 1
    assert "--json" in capsys.readouterr().err


def test_eval_prints_results_before_writing_them(tmp_path, checkpoint_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bml.evaluate, "write_results", full_disk)
    assert eval_bml.main(eval_args(checkpoint_path, tmp_path / "out")) == 1
    captured = capsys.readouterr()
    assert "==> Mean ACC on glyphs_val" in captured.out and "could not be written" in captured.err


# 5. A run folder belongs to one run


def test_fresh_run_never_takes_a_folder_that_holds_a_run(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    assert train(folder) == 0
    before = (folder / "last.pth").read_bytes(), (folder / "log.txt").read_text()
    assert train(folder, "--seed", "1") == 1
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--is_continue" in error and "delete that folder" in error
    assert ((folder / "last.pth").read_bytes(), (folder / "log.txt").read_text()) == before
    monkeypatch.chdir(tmp_path)   # the default folder output/<name>: the next free <name>-2
    assert train(None) == 0 and train(None) == 0
    first, second = sorted((tmp_path / "output").iterdir())
    assert second.name == f"{first.name}-2" and len(epoch_log(first)) == len(epoch_log(second)) == 1
    assert "this run goes to" in capsys.readouterr().out


def test_a_second_run_into_a_busy_folder_stops_at_once(tmp_path, capsys, no_training):
    folder = tmp_path / "run"
    folder.mkdir()
    with folder_lock(folder):
        assert train(folder) == 1
    assert "another run" in capsys.readouterr().err


def test_the_lock_of_a_killed_run_does_not_stay(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bml.utils.io import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)",
                               str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputError, match="another run"):
        with folder_lock(folder):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with folder_lock(folder):
        pass


# 6. Full disk and killed saves


def full_disk_on_save(monkeypatch, after: int = 0) -> None:
    """torch.save into a file fails with ENOSPC after `after` successful checkpoint saves."""
    original, saves = torch.save, {"count": 0}

    def save(obj, file, *args, **kwargs):
        if hasattr(file, "name"):   # a real file, not the size counter
            saves["count"] += 1
            if saves["count"] > after:
                file.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_is_said_and_the_previous_checkpoint_stays(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    full_disk_on_save(monkeypatch, after=1)   # epoch 1's last.pth is saved, epoch 2's is not
    assert train(folder, "--epochs", "2") == 1
    error = capsys.readouterr().err
    assert "no space left on device" in error and str(folder) in error and "bytes" in error
    assert read_checkpoint(folder / "last.pth")["epoch"] == 1
    assert [line["epoch"] for line in epoch_log(folder)] == [1]   # no line for the epoch that was not saved
    assert not list(folder.glob(".*.tmp"))


def test_orphan_temporary_checkpoints_are_removed_on_the_next_start(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    orphan = folder / ".last.pth.abc123xy.tmp"   # what a SIGKILL during a save leaves (mkstemp's name)
    orphan.write_bytes(b"half a checkpoint")
    assert train(folder) == 0
    assert not orphan.exists() and (folder / "last.pth").is_file()


def test_sigterm_on_a_full_disk_still_exits_143(tmp_path, capsys, monkeypatch, on_losses_call):
    on_losses_call(1, send_sigterm)
    full_disk_on_save(monkeypatch)
    assert train(tmp_path / "run", "--episodes_per_epoch", "3") == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "no space left on device" in captured.err and "could not save" in captured.out


def test_checkpoints_and_results_get_the_mode_of_other_new_files(tmp_path):
    save_checkpoint(tmp_path / "last.pth", {"model": {}})
    (tmp_path / "log.txt").write_text("")
    assert (tmp_path / "last.pth").stat().st_mode == (tmp_path / "log.txt").stat().st_mode


# 9. Resume errors are messages


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run folder after two epochs of one step."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert train(folder, "--epochs", "2") == 0
    return folder


@pytest.fixture
def trained_run(tmp_path, finished_run) -> Path:
    """A copy of `finished_run` to edit."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def edit_checkpoint(path: Path, edit) -> None:
    checkpoint = read_checkpoint(path)
    edit(checkpoint)
    torch.save(checkpoint, path)


def nan_weights(checkpoint: dict) -> None:
    checkpoint["model"] = {key: value.float() * float("nan") for key, value in checkpoint["model"].items()}


def mismatched_momentum(checkpoint: dict) -> None:
    first = checkpoint["optimizer"]["state"][0]
    first["momentum_buffer"] = first["momentum_buffer"].flatten()[:3]


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c.pop(key) for key in ("optimizer", "training_state", "scaler", "rng")], "holds weights only"),
    (lambda c: c["training_state"].update(epoch=-1), "training_state"),
    (lambda c: c["training_state"].update(epoch="2"), "training_state"),
    (lambda c: c["training_state"].update(surprise=1), "training_state"),
    (mismatched_momentum, "optimiser state"),
    (lambda c: c["optimizer"]["param_groups"].append(dict(c["optimizer"]["param_groups"][0])), "optimiser state"),
    (nan_weights, "non-finite weights"),
])
def test_resume_errors_are_messages(trained_run, capsys, edit, message):
    edit_checkpoint(trained_run / "last.pth", edit)
    assert train(trained_run, "--epochs", "3", "--is_continue") == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_weights_growing_past_the_bound_stop_like_a_non_finite_loss(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(guard, "WEIGHT_GROWTH_LIMIT", 0.5)   # any epoch "grows" past half the start
    monkeypatch.setattr(sys, "argv", ["train_bml.py", "--lr", "0.1", "--amp=off", "--epochs", "1"])
    assert train(tmp_path / "run") == 1
    error = capsys.readouterr().err
    assert "times its value at the start" in error and "no checkpoint was written yet" in error
    resume = error.splitlines()[-1]
    assert "--is_continue" in resume and "--lr" not in resume and "--amp" not in resume and "--epochs 1" in resume
    assert not (tmp_path / "run" / "last.pth").exists()


# 10. Small


def test_the_signal_message_is_printed_once_not_by_each_loader_worker(capsys, monkeypatch):
    stop = signals.StopOnSignal()
    monkeypatch.setattr(os, "getpid", lambda: stop.pid + 1)   # as in a forked loader worker
    stop.handle(signal.SIGINT, None)
    assert stop.requested() and capsys.readouterr().out == ""
    parent = signals.StopOnSignal()
    monkeypatch.setattr(os, "getpid", lambda: parent.pid)
    parent.handle(signal.SIGINT, None)
    assert capsys.readouterr().out.count("SIGINT received") == 1


class SignalledInWorker(torch.utils.data.Dataset):
    """Eight constant images; loading image `at` in a loader worker sends SIGTERM to that worker, as stopping a
    job signals every process of it (SLURM's scancel, `kill -- -PGID`)."""

    labels = np.arange(8) % 2

    def __init__(self, at: int) -> None:
        self.at = at

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index == self.at and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.full((3, 4, 4), float(index)), int(self.labels[index])


class MeanView(torch.nn.Module):
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (images.mean((2, 3)),)


def test_loader_workers_outlive_a_sigterm_so_the_main_process_can_save():
    """PyTorch's workers die on a SIGTERM from outside; the main process would then fail on the lost worker
    instead of stopping after the step with its checkpoint. The training and the evaluation loaders' workers
    leave it to the main process: every batch still arrives."""
    steps = list(build_step_loader(SignalledInWorker(at=3), {0: np.arange(8).reshape(4, 2)}.__getitem__, (0,),
                                   first=(0, 0), last_epoch=0, steps_per_epoch=4, num_workers=1))
    assert [images[:, 0, 0, 0].tolist() for images, _ in steps] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    (embedded,) = embed_dataset(MeanView(), SignalledInWorker(at=3),
                                EmbeddingOptions(batch_size=2, num_workers=1, storage_dtype=torch.float32,
                                                 progress=False))
    assert embedded[:, 0].tolist() == list(range(8))


def test_architecture_mismatch_lists_a_few_keys_and_a_count():
    weights = BML(num_classes=5, width=0.125).state_dict()
    with pytest.raises(CheckpointError) as raised:
        check_state_dict(BML(num_classes=5, width=0.25), weights)
    message = str(raised.value)
    count = sum(value.dim() > 1 for value in weights.values())
    assert "mis-shaped (" in message and "more" in message and len(message) < 2000 and count > 5


# 7. Bad images are found when a data set is opened


def write_truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize("make_bad", [
    lambda path: path.write_bytes(b""),
    lambda path: path.write_text("this is text, not a picture"),
    write_truncated_jpeg,
    lambda path: path.symlink_to(Path(__file__)),
    lambda path: path.symlink_to(path.parent / "missing.png"),
])
def test_bad_image_files_are_named_when_the_data_set_is_opened(tmp_path, make_bad):
    make_image_folder(tmp_path, "mine", images_per_class=3)
    bad = tmp_path / "mine" / "train" / "class_1" / "bad.jpg"
    make_bad(bad)
    with pytest.raises(DatasetError, match="1 of 13 image files are not usable") as raised:
        build_dataset("mine", "train", data_root=tmp_path, image_size=16)
    assert str(bad) in str(raised.value)
    assert len(build_dataset("mine", "val", data_root=tmp_path, image_size=16)) == 9


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    make_image_folder(tmp_path, "mine", images_per_class=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)   # the 10 x 10 fixtures now count as bombs
    with pytest.raises(DatasetError, match="DecompressionBomb"):
        build_dataset("mine", "test", data_root=tmp_path, image_size=16)


def test_sixteen_bit_and_float_images_keep_their_range(tmp_path):
    ramp = np.linspace(0, 1, 100).reshape(10, 10)
    folder = tmp_path / "mine" / "train" / "deep"
    folder.mkdir(parents=True)
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(folder / "a.png")
    Image.fromarray(ramp.astype(np.float32)).save(folder / "b.tif")
    (tmp_path / "mine" / "train" / "plain").mkdir()
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(tmp_path / "mine" / "train" / "plain" / "c.png")
    dataset = build_dataset("mine", "train", data_root=tmp_path, image_size=16)
    eight_bit = np.asarray(dataset.load_image(2))
    assert np.abs(np.asarray(dataset.load_image(0)).astype(int) - eight_bit).max() <= 1
    assert np.abs(np.asarray(dataset.load_image(1)).astype(int) - eight_bit).max() <= 1
    Image.fromarray((ramp * 7).astype(np.float32)).save(folder / "b.tif")
    with pytest.raises(DatasetError, match="outside 0..1"):
        build_dataset("mine", "train", data_root=tmp_path, image_size=16)


def test_a_linked_class_folder_is_one_class(tmp_path):
    make_image_folder(tmp_path, "mine", classes=(4, 3, 3), images_per_class=3)
    (tmp_path / "mine" / "train" / "zz_link").symlink_to(tmp_path / "mine" / "train" / "class_0")
    dataset = build_dataset("mine", "train", data_root=tmp_path, image_size=16)
    assert dataset.num_classes == 4 and len(dataset) == 12


# 8. Caches heal


def test_a_truncated_glyphs_cache_is_rebuilt(capsys):
    from bml.datasets.glyphs import cache_path, load_glyphs, read_cache

    load_glyphs()
    intact = cache_path().read_bytes()
    cache_path().write_bytes(intact[: len(intact) // 2])
    arrays = load_glyphs()
    assert arrays["images"].shape[0] == 6000 and "rebuilding it" in capsys.readouterr().err
    assert read_cache(cache_path())["images"].shape == arrays["images"].shape   # written whole again


def test_a_tiered_npz_with_a_crc_error_says_what_to_delete(tmp_path):
    make_tiered(tmp_path)
    path = tmp_path / "tieredImageNet" / "test_images.npz"
    data = bytearray(path.read_bytes())
    data[-300] ^= 0xFF   # a flipped bit in the stored (uncompressed) pixels: the member's CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="delete it and download it again"):
        build_dataset("tieredImageNet", "test", data_root=tmp_path)
