"""What a result names: the checkpoint (path, sha256, size) in the results file and JSON, results of another
checkpoint never replaced, TF32 as evaluated, the data copy's fingerprint, and tieredImageNet's stored labels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import bml.datasets.readers
import bml.evaluate
import eval_bml
import train_bml
from bml.datasets import build_dataset, summarize
from bml.datasets.__main__ import main as datasets_main
from bml.datasets.fingerprint import SAMPLE_IMAGES, sample_rows
from bml.evaluation import CheckpointIdentity, results_paths
from bml.models import BML
from bml.training import run_data
from bml.training.settings import finish_settings
from bml.utils import distributed
from bml.utils.io import OutputError
from fixtures import make_cub, make_pickle_split_dataset, make_tiered, save_released_checkpoint


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """CIFAR-FS layout: 5 test classes x 16 images (1-shot 15-query needs 16)."""
    return make_pickle_split_dataset(tmp_path_factory.mktemp("data"), "CIFAR-FS", classes=(6, 5, 5),
                                     images_per_class=16, image_size=32)


def released(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_released_checkpoint(path, BML(num_classes=6, width=0.125), dataset="CIFAR-FS", backbone="Res12")


def evaluate(checkpoint: Path, data_root: Path, out: Path, *extra: str) -> int:
    args = eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--n_shots", "1", "--episodes", "5",
         "--seeds", "0", "1", "--num_workers", "0", "--device", "cpu", "--output_dir", str(out), "--no_progress",
         *extra])
    return eval_bml.main(args)


# --- 9, 10: results that name their checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def two_evaluations(tmp_path_factory, data_root) -> dict:
    """Two checkpoints evaluated one after the other into one folder (their output kept)."""
    folder = tmp_path_factory.mktemp("evaluations")
    first, second = released(folder / "a.pth", 0), released(folder / "b.pth", 1)
    outputs = []
    for checkpoint in (first, second):
        with pytest.MonkeyPatch.context() as patch:
            lines = []
            patch.setattr(bml.evaluate.messages, "info", lines.append)
            assert evaluate(checkpoint, data_root, folder / "out") == 0
            outputs.append("\n".join(lines))
    return {"first": first, "second": second, "out": folder / "out", "messages": outputs}


def test_results_of_another_checkpoint_are_never_replaced(two_evaluations):
    out, first, second = two_evaluations["out"], two_evaluations["first"], two_evaluations["second"]
    moved = out / "CIFAR-FS_bml_eval_results_1shot-2.txt"
    assert f"holds results that are not this checkpoint's; these go to {moved}" in two_evaluations["messages"][1]
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == [   # .results.lock aside
        "CIFAR-FS_bml_eval_results_1shot-2.json", "CIFAR-FS_bml_eval_results_1shot-2.txt",
        "CIFAR-FS_bml_eval_results_1shot.json", "CIFAR-FS_bml_eval_results_1shot.txt"]
    for name, checkpoint in (("CIFAR-FS_bml_eval_results_1shot", first), ("CIFAR-FS_bml_eval_results_1shot-2", second)):
        sha256, size = hashlib.sha256(checkpoint.read_bytes()).hexdigest(), checkpoint.stat().st_size
        saved = json.loads((out / f"{name}.json").read_text())
        assert (saved["checkpoint"], saved["checkpoint_sha256"], saved["checkpoint_bytes"]) == (str(checkpoint), sha256,
                                                                                               size)
        lines = (out / f"{name}.txt").read_text().splitlines()
        assert lines[:2] == [f"# checkpoint: {checkpoint}", f"# checkpoint sha256: {sha256} ({size} bytes)"]
        assert [line.split(":")[0] for line in lines[2:4]] == ["0", "1"]
        assert lines[-1] == f"==> Mean ACC on CIFAR-FS: {saved['results']['bml']['acc']:.4f}"   # still the last line
    for checkpoint, name in ((first, "CIFAR-FS_bml_eval_results_1shot.txt"), (second, moved.name)):
        paths = results_paths("CIFAR-FS", 1, CheckpointIdentity.of(checkpoint), out)   # a re-run replaces its own
        assert (paths.text.name, paths.json) == (name, paths.text.with_suffix(".json"))


def test_eval_prints_and_records_the_checkpoint_hash_and_the_data_fingerprint(two_evaluations, data_root):
    checkpoint = two_evaluations["first"]
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"sha256 {sha256}, {checkpoint.stat().st_size:,} bytes" in two_evaluations["messages"][0]
    saved = json.loads((two_evaluations["out"] / "CIFAR-FS_bml_eval_results_1shot.json").read_text())
    assert saved["data_fingerprint"] == summarize("CIFAR-FS", data_root)["test"]["fingerprint"]
    assert saved["tf32"] is False                                    # never TF32 on the CPU


def test_an_explicit_json_of_another_checkpoint_is_refused_before_embedding(two_evaluations, data_root, capsys,
                                                                             monkeypatch):
    taken = two_evaluations["out"] / "CIFAR-FS_bml_eval_results_1shot.json"
    before = taken.read_text()
    monkeypatch.setattr(bml.evaluate, "evaluate_heads", lambda *a, **k: pytest.fail("evaluated"))
    assert evaluate(two_evaluations["second"], data_root, two_evaluations["out"], "--json", str(taken)) == 1
    err = capsys.readouterr().err
    assert f"--json {taken} holds the results of another checkpoint" in err
    assert taken.read_text() == before


def test_a_results_file_that_names_no_checkpoint_is_kept(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"weights")
    identity = CheckpointIdentity.of(tmp_path / "model.pth")
    published = tmp_path / "miniImageNet_bml_eval_results_5shot.txt"
    published.write_text("0: 82.0000\n==> Mean ACC on miniImageNet: 82.0000\n")   # the original's format
    paths = results_paths("miniImageNet", 5, identity, tmp_path)
    assert (paths.text.name, paths.json.name, paths.taken) == (
        "miniImageNet_bml_eval_results_5shot-2.txt", "miniImageNet_bml_eval_results_5shot-2.json", published)
    with pytest.raises(OutputError, match="another checkpoint"):
        (tmp_path / "old.json").write_text(json.dumps({"checkpoint": "x.pth"}))
        results_paths("miniImageNet", 5, identity, tmp_path, tmp_path / "old.json")


# --- 4: TF32 in evaluation -------------------------------------------------------------------------------

@pytest.fixture
def restore_tf32():
    """Whatever the test sets, torch's TF32 switches are as before afterwards."""
    switches = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
    before = [getattr(backend, name) for backend, name in switches]
    yield
    for (backend, name), value in zip(switches, before):
        setattr(backend, name, value)


def test_eval_takes_the_training_tf32_flag_and_sets_it_on_a_gpu(simulate_gpu, restore_tf32):
    evaluation = eval_bml.get_args_parser().parse_args(["--ckp_path", "x.pth", "--tf32", "off"])
    training = train_bml.get_args_parser().parse_args(["--tf32", "off"])
    assert evaluation.tf32 == training.tf32 == "off"
    simulate_gpu((8, 0))
    assert bml.evaluate.configure_precision("off", torch.device("cuda")) is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert bml.evaluate.configure_precision("on", torch.device("cuda")) is True
    assert torch.backends.cudnn.allow_tf32 is True
    simulate_gpu((7, 0))                                              # a V100: no TF32 whatever the flag
    assert bml.evaluate.configure_precision("on", torch.device("cuda")) is False


def test_eval_leaves_tf32_alone_on_the_cpu(monkeypatch):
    monkeypatch.setattr(bml.evaluate, "configure_tf32", lambda tf32: pytest.fail("configured"))
    assert bml.evaluate.configure_precision("on", torch.device("cpu")) is False


# --- 10: data fingerprints -------------------------------------------------------------------------------

def test_fingerprints_tell_copies_apart_without_reading_every_image(tmp_path, monkeypatch):
    stored, compressed = tmp_path / "stored", tmp_path / "compressed"
    make_tiered(stored, images_per_class=10)
    make_tiered(compressed, images_per_class=10, compressed=True)
    monkeypatch.setattr(bml.datasets.readers, "read_npz_arrays", lambda *a, **k: pytest.fail("read every image"))
    reference = summarize("tieredImageNet", stored)
    assert summarize("tieredImageNet", compressed) == reference       # the same data, however it is stored
    train = reference["train"]["fingerprint"]
    assert (train["images"], train["image_shape"], train["sampled"]) == (70, [8, 8, 3], SAMPLE_IMAGES)
    monkeypatch.undo()

    folder = stored / "tieredImageNet"
    images = np.load(folder / "test_images.npz")["images"]
    unsampled = next(row for row in range(len(images)) if row not in sample_rows(len(images)))
    images[unsampled] ^= 1
    np.savez(folder / "test_images.npz", images=images)
    assert summarize("tieredImageNet", stored)["test"] == reference["test"]   # only the sample is read
    images[sample_rows(len(images))[3]] ^= 1
    np.savez(folder / "test_images.npz", images=images)
    changed = summarize("tieredImageNet", stored)
    assert changed["test"]["fingerprint"]["pixels"] != reference["test"]["fingerprint"]["pixels"]
    assert changed["test"]["fingerprint"]["labels"] == reference["test"]["fingerprint"]["labels"]
    assert changed["train"] == reference["train"]


def test_file_layout_fingerprints_hash_a_sample_of_files(tmp_path, capsys):
    make_cub(tmp_path, images_per_class=10)
    reference = summarize("CUB", tmp_path)
    assert reference["train"]["fingerprint"]["sampled"] == min(SAMPLE_IMAGES, 40)
    data = bml.datasets.read_split("CUB", "val", tmp_path, allow_uncropped_cub=True)
    first = Path(data.paths[0])
    first.write_bytes(first.read_bytes() + b"\0")                     # the same image, another file
    changed = summarize("CUB", tmp_path)
    assert changed["val"]["fingerprint"]["pixels"] != reference["val"]["fingerprint"]["pixels"]
    assert changed["train"] == reference["train"]
    assert datasets_main(["summary", "--dataset", "CUB", "--data_root", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    fingerprint = changed["val"]["fingerprint"]
    assert ["val", "30", "10x12x3", fingerprint["labels"], fingerprint["pixels"]] in rows


# --- 5: tieredImageNet's stored labels -------------------------------------------------------------------

def test_summary_says_whether_tiered_train_and_val_ids_overlap(tmp_path, capsys):
    overlapping, apart = tmp_path / "overlapping", tmp_path / "apart"
    make_tiered(overlapping)
    make_tiered(apart, offset_ids=True)
    summary = summarize("tieredImageNet", overlapping)
    assert summary["train"]["stored_labels"] == {"train_labels.pkl": {"first": 0, "last": 3, "ids": 4},
                                                 "val_labels.pkl": {"first": 0, "last": 2, "ids": 3}}
    assert summary["train"]["shared_label_ids"] == 3 and "shared_label_ids" not in summary["val"]
    assert summarize("tieredImageNet", apart)["train"]["stored_labels"]["val_labels.pkl"] == {
        "first": 4, "last": 6, "ids": 3}
    assert summarize("tieredImageNet", apart)["train"]["shared_label_ids"] == 0
    assert datasets_main(["summary", "--dataset", "tieredImageNet", "--data_root", str(overlapping)]) == 0
    text = capsys.readouterr().out
    assert "train_labels.pkl 0..3 (4 ids), val_labels.pkl 0..2 (3 ids): 3 ids in both" in text
    assert "a 7-way classifier" in text and "--tiered_labels raw" in text
    assert datasets_main(["summary", "--dataset", "tieredImageNet", "--data_root", str(apart)]) == 0
    assert "do not overlap" in capsys.readouterr().out


def test_raw_tiered_labels_merge_val_classes_into_train_outputs_as_the_original(tmp_path):
    make_tiered(tmp_path)
    folder = tmp_path / "tieredImageNet"
    stored = [bml.datasets.load_pickle(folder / f"{part}_labels.pkl")["labels"] for part in ("train", "val")]
    raw = build_dataset("tieredImageNet", "train", tmp_path, tiered_labels="raw")
    offset = build_dataset("tieredImageNet", "train", tmp_path)
    assert raw.num_classes == offset.num_classes == 7                  # the original's 448 = 351 + 97 outputs
    np.testing.assert_array_equal(raw.labels, np.concatenate(stored))
    assert len(np.unique(raw.labels)) == 4 and len(np.unique(offset.labels)) == 7
    assert raw.class_names[:4] == ["train/0+val/0", "train/1+val/1", "train/2+val/2", "train/3"]
    assert raw.class_names[4:] == ["unused/4", "unused/5", "unused/6"]
    np.testing.assert_array_equal(raw.images, offset.images)
    test = build_dataset("tieredImageNet", "test", tmp_path, tiered_labels="raw")   # one file: nothing to merge
    np.testing.assert_array_equal(test.labels, build_dataset("tieredImageNet", "test", tmp_path).labels)


def test_raw_tiered_labels_of_offset_ids_are_the_default_labels(tmp_path):
    make_tiered(tmp_path, offset_ids=True)
    np.testing.assert_array_equal(build_dataset("tieredImageNet", "train", tmp_path, tiered_labels="raw").labels,
                                  build_dataset("tieredImageNet", "train", tmp_path).labels)


def test_training_reads_tiered_labels_as_its_flag_says(tmp_path):
    make_tiered(tmp_path)
    context = distributed.init_distributed_mode("cpu")
    classes = {}
    for choice in ("offset", "raw"):
        args = train_bml.get_args_parser().parse_args(
            ["--dataset", "tieredImageNet", "--data_root", str(tmp_path), "--tiered_labels", choice,
             "--n_train_ways", "3", "--n_train_shots", "1", "--n_train_queries", "1", "--num_workers", "0",
             "--device", "cpu"])
        finish_settings(args, context)
        data = run_data.open_data(args, context)
        classes[choice] = (args.num_classes, len(np.unique(data.train_set.labels)))
    assert classes == {"offset": (7, 7), "raw": (7, 4)}
