"""No silent wrong result (issue 28, items 4-8): caches that check what they hold, temperatures within their range,
float16 underflow, resumes with other settings, and images as they are meant to be seen (see docs/RELIABILITY.md)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bml import FewShotClassifier
from bml.checkpoint import read_calibration, read_checkpoint, save_checkpoint, with_calibration
from bml.classifier import load_rgb
from bml.datasets import FileDataset, decoded, glyphs
from bml.datasets.image_files import cache_dir, read_image_sizes
from bml.evaluation.base_means import base_class_means, base_means_path
from bml.models import BML
from bml.predict import get_args_parser, main
from bml.scoring import COMBINED
from fixtures import save_released_checkpoint
from test_device_augment import mixed_size_dataset, smooth_images
from test_heads import QUIET, TwoViews, clustered_points
from test_reliability import evaluate_points, train
from test_training import one_thread  # noqa: F401  (an autouse fixture, used here too)


# ----------------------------------------------------------------------------------------------
# 4. Caches check what they were built from and what they hold


def swap_image_rows(pixels_path: Path, index: np.ndarray) -> None:
    """The first two pixel rows of image 0 exchanged in the store."""
    pixels = np.load(pixels_path, mmap_mode="r+")
    offset, _, width = (int(value) for value in index[0, :3])
    row = width * 3
    first = pixels[offset:offset + row].copy()
    pixels[offset:offset + row] = pixels[offset + row:offset + 2 * row]
    pixels[offset + row:offset + 2 * row] = first
    pixels.flush()


def swap_index_rows(index_path: Path, index: np.ndarray) -> None:
    """Images 0 and 1 exchanged in the index: each row would serve the other image (with this image's label)."""
    np.save(index_path, index[[1, 0, *range(2, len(index))]])


def flip_a_byte(pixels_path: Path, index: np.ndarray) -> None:
    data = bytearray(pixels_path.read_bytes())
    data[-100] ^= 0xFF
    pixels_path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [flip_a_byte, swap_index_rows, swap_image_rows])
def test_a_damaged_decoded_store_is_rebuilt_not_served(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("BML_CACHE_DIR", str(tmp_path / "cache"))
    dataset = mixed_size_dataset(tmp_path)
    dataset.decode_once()
    pixels_path = dataset.decoded.pixels_path
    index_path = pixels_path.with_suffix(".index.npy")
    damage(index_path if damage is swap_index_rows else pixels_path, np.load(index_path))
    again = mixed_size_dataset(tmp_path)
    again.decode_once()
    assert "rebuilding it" in capsys.readouterr().err
    for i in range(len(again)):
        assert np.array_equal(again.load_array(i), np.asarray(again.load_image(i)))


def test_a_file_replaced_with_the_same_size_and_time_builds_a_new_store(tmp_path, monkeypatch):
    """BMP files of one size have one byte count: the replacement differs only in its pixels."""
    monkeypatch.setenv("BML_CACHE_DIR", str(tmp_path / "cache"))
    images = smooth_images(3, 20, seed=1)
    paths = [tmp_path / f"image_{k}.bmp" for k in range(2)]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)

    def opened() -> FileDataset:
        dataset = FileDataset(np.array([str(path) for path in paths]), np.arange(2), ["a", "b"], name="bmp",
                              split="train")
        dataset.decode_once()
        return dataset

    before = opened()
    status = paths[0].stat()
    Image.fromarray(images[2]).save(paths[0])
    os.utime(paths[0], ns=(status.st_atime_ns, status.st_mtime_ns))
    assert paths[0].stat().st_size == status.st_size and paths[0].stat().st_mtime_ns == status.st_mtime_ns
    after = opened()
    assert after.decoded.pixels_path != before.decoded.pixels_path
    assert np.array_equal(after.load_array(0), images[2])


def test_a_glyphs_cache_with_its_splits_swapped_is_rebuilt(capsys, monkeypatch):
    arrays = glyphs.load_glyphs()
    monkeypatch.setattr(glyphs, "build_glyphs", lambda: arrays)   # rendered as before, without the wait
    path = glyphs.cache_path()
    with np.load(path, allow_pickle=False) as cached:
        stored = {key: cached[key] for key in cached.files}
    split = stored["class_split"]
    swapped = np.where(split == "train", "test", np.where(split == "test", "train", split))
    np.savez_compressed(path, **{**stored, "class_split": swapped})   # anything else (a digest) kept
    data = glyphs.read_glyphs(None, "test")
    assert "rebuilding it" in capsys.readouterr().err
    np.testing.assert_array_equal(glyphs.load_glyphs()["class_split"], arrays["class_split"])
    assert set(data.class_names) == {str(c) for c in arrays["characters"][arrays["class_split"] == "test"]}


def stored_means(saved) -> list[torch.Tensor]:
    return saved["means"] if isinstance(saved, dict) else saved   # a plain list: as r-train wrote the file


def edited_values(saved):
    means = [2 * mean + 1 for mean in stored_means(saved)]
    return {**saved, "means": means} if isinstance(saved, dict) else means


def of_another_model(saved):
    return {**saved, "key": "0" * 64} if isinstance(saved, dict) else {"key": "0" * 64, "means": saved}


def as_r_train_wrote(saved):
    return [2 * mean for mean in stored_means(saved)]


@pytest.mark.parametrize("edit", [edited_values, of_another_model, as_r_train_wrote])
def test_a_base_means_file_with_other_values_is_embedded_again(tmp_path, capsys, edit):
    base, model = clustered_points(classes=4, per_class=5, seed=3), TwoViews()
    means = base_class_means(model, base, QUIET, means_dir=tmp_path)
    path = base_means_path(model, base, QUIET.amp, tmp_path)
    torch.save(edit(torch.load(path, weights_only=True)), path)   # the right shapes, other values
    again = base_class_means(model, base, QUIET, means_dir=tmp_path)
    assert "embedding the base classes again" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(again, means))
    assert all(torch.equal(a, b) for a, b in zip(base_class_means(model, base, QUIET, means_dir=tmp_path), means))
    assert capsys.readouterr().err == ""   # the rewritten file is trusted


def test_base_means_live_in_the_project_cache_folder(tmp_path, monkeypatch, bml_cache_dir):
    from bml.evaluation.base_means import base_means_dir

    assert base_means_dir() == cache_dir() / "base_means" == bml_cache_dir / "base_means"
    calls = []
    monkeypatch.setattr("bml.classifier.base_class_means", lambda *args, **kwargs: calls.append(kwargs) or ())
    path = save_released_checkpoint(tmp_path / "tiny.pth", BML(num_classes=4, width=0.125), model="bml",
                                    backbone="resnet12", width=0.125, num_classes=4, dataset="glyphs",
                                    image_size=32, transform="O")
    FewShotClassifier.from_checkpoint(path, device="cpu", head="cl2n", progress=False)
    assert calls[0]["means_dir"] == bml_cache_dir / "base_means"


# ----------------------------------------------------------------------------------------------
# 5. Temperatures are finite positive numbers within their range, or they are ignored


@pytest.mark.parametrize("temperature", [1e308, 1e-320, True, float("nan"), float("inf"), -1.0, 0.0, "2.0"])
def test_temperatures_outside_their_range_are_ignored_with_a_warning(tmp_path, capsys, temperature):
    record = read_calibration({"calibration": {"temperatures": {COMBINED: temperature, "global": 2.5}}})
    assert record["temperatures"] == {"global": 2.5}
    assert "ignored" in capsys.readouterr().err
    path = save_released_checkpoint(tmp_path / "tiny.pth", BML(num_classes=4, width=0.125), model="bml",
                                    backbone="resnet12", width=0.125, num_classes=4, dataset="glyphs",
                                    image_size=32, transform="O")
    save_checkpoint(path, with_calibration(read_checkpoint(path), {"temperatures": {COMBINED: temperature}}))
    classifier = FewShotClassifier.from_checkpoint(path, device="cpu", progress=False)
    assert classifier.temperature is None and COMBINED in capsys.readouterr().err
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probabilities = classifier.fit(images[:4], ["a", "a", "b", "b"]).predict_proba(images[4:])
    assert np.isfinite(probabilities).all()


# ----------------------------------------------------------------------------------------------
# 6. Embeddings below float16's range are stored in float32, and the results say so


@pytest.mark.parametrize("scale", [1e-9, 1e-6])
def test_float16_cache_falls_back_to_float32_when_features_are_below_its_range(capsys, scale):
    report: dict = {}
    small = evaluate_points(scale, torch.float16, report)
    reference = evaluate_points(1.0, torch.float32)
    assert {name: result["acc"] for name, result in small.items()} == \
        {name: result["acc"] for name, result in reference.items()}
    assert report["storage"] == "float32" and "below" in report["storage_note"]
    assert "smallest normal" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# 7. --is_continue compares every setting that shapes training and refuses counters it cannot continue from


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resumed") / "run"
    assert train(folder, "--episodes_per_epoch", "3") == 0
    return folder


CHANGED = {"--n_train_ways": "4", "--clip_grad": "1", "--drop_rate": "0.2", "--weights": "1_1_0"}


def test_resuming_with_other_settings_names_each(finished_run, tmp_path, capsys):
    """A resume into one more epoch (a finished run has nothing to continue) with four settings changed."""
    resumed = tmp_path / "run"
    shutil.copytree(finished_run, resumed)
    flags = [part for flag, value in CHANGED.items() for part in (flag, value)]
    assert train(resumed, "--episodes_per_epoch", "3", "--epochs", "2", "--is_continue", *flags) == 0
    error = capsys.readouterr().err
    assert "settings that differ from the checkpoint's" in error
    assert [flag for flag in CHANGED if f"{flag[2:]} " not in error] == []


def edited_copy(run: Path, target: Path, **training_state) -> Path:
    target.mkdir()
    checkpoint = read_checkpoint(run / "last.pth")
    checkpoint["training_state"] = {**checkpoint["training_state"], **training_state}
    save_checkpoint(target / "last.pth", checkpoint)
    (target / "config.json").write_text('{"written": "before"}')
    return target


@pytest.mark.parametrize("training_state, flags, message", [
    ({"epoch": 0, "epoch_step": 2}, ["--episodes_per_epoch", "1"], "--episodes_per_epoch 3"),   # 2 steps done of 1
    ({"epoch": 3, "epoch_step": 0}, ["--episodes_per_epoch", "3"], "past --epochs 1"),
    ({"epoch": 1, "epoch_step": 1}, ["--episodes_per_epoch", "3"], "past --epochs 1"),
])
def test_counters_a_resume_cannot_continue_from_are_refused_before_writing(finished_run, tmp_path, capsys,
                                                                           training_state, flags, message):
    run = edited_copy(finished_run, tmp_path / "run", **training_state)
    assert train(run, *flags, "--is_continue") == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert (run / "config.json").read_text() == '{"written": "before"}'


# ----------------------------------------------------------------------------------------------
# 8. Prediction sees photos upright, says when queries are support images, names dangling links


def sideways(path: Path, upright: np.ndarray, orientation: int) -> Path:
    """`upright` stored turned, with the EXIF orientation that turns it back."""
    stored = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    image = Image.fromarray(upright).transpose(stored[orientation])
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_images_are_read_upright_as_their_exif_orientation_says(tmp_path, orientation):
    upright = smooth_images(1, 30, seed=4)[0][:18]   # 18 x 30: a turn changes the shape
    path = sideways(tmp_path / "photo.png", upright, orientation)
    assert np.array_equal(np.asarray(load_rgb(path)), upright)   # prediction and the contact sheet
    dataset = FileDataset(np.array([str(path)]), np.zeros(1), ["a"], name="photos", split="train")
    assert np.array_equal(np.asarray(dataset.load_image(0)), upright)   # training
    assert read_image_sizes(np.array([str(path)])).tolist() == [[18, 30]]


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_released_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", BML(num_classes=4, width=0.125),
                                    model="bml", backbone="resnet12", width=0.125, num_classes=4, dataset="glyphs",
                                    image_size=32, transform="O")


def support_folder(root: Path) -> Path:
    for c, colour in enumerate(((230, 30, 20), (20, 40, 230))):
        for shot in range(2):
            (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + shot, 20), colour).save(root / f"class_{c}" / f"s{shot}.png")
    return root


def run_predict(capsys, released: Path, support: Path, query: Path, out: Path) -> tuple[int, str]:
    code = main(get_args_parser().parse_args(["--ckp_path", str(released), "--support", str(support), "--query",
                                              str(query), "--out", str(out), "--device", "cpu", "--num_workers",
                                              "0", "--no_progress"]))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("query", ["support", "support/class_0", "support/class_0/s0.png"])
def test_queries_that_are_support_images_are_said(tmp_path, capsys, released, query):
    support = support_folder(tmp_path / "support")
    code, output = run_predict(capsys, released, support, tmp_path / query, tmp_path / "out.csv")
    assert code == 0 and "support images too" in output


@pytest.mark.parametrize("where", ["query", "support/class_1"])
def test_a_dangling_link_is_named_in_the_warning(tmp_path, capsys, released, where):
    support = support_folder(tmp_path / "support")
    queries = tmp_path / "query"
    queries.mkdir()
    Image.new("RGB", (20, 20), (230, 30, 20)).save(queries / "q.png")
    (tmp_path / where / "gone.png").symlink_to(tmp_path / "missing.png")
    code, output = run_predict(capsys, released, support, queries, tmp_path / "out.csv")
    assert code == 0 and "gone.png" in output and "does not exist" in output
