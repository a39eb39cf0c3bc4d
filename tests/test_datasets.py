"""Readers, the restricted unpickler, the npz reader, glyphs, errors and the summary CLI, on fixtures."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import (PICKLE_FILES, make_cub, make_image_folder, make_omniglot, make_pickle_split_dataset,
                      make_tiered, write_python2_pickle)

from bml.datasets import (DATASET_NAMES, DatasetError, build_dataset, load_pickle, read_npz_arrays, read_split,
                          resolve_data_root, summarize)
from bml.datasets import glyphs
from bml.datasets.__main__ import main as datasets_main

PICKLE_NAMES = tuple(PICKLE_FILES)


def assert_remapped(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
    """Labels are 0..C-1 in sorted order of the original ids, which the fixtures store in pixel [0,0,0]."""
    original = images[:, 0, 0, 0].astype(int)
    assert sorted(int(n) for n in class_names) == [int(n) for n in class_names]
    assert (np.array([int(n) for n in class_names])[labels] == original).all()
    assert set(labels.tolist()) == set(range(len(class_names)))


@pytest.mark.parametrize("label_format", ["list", "scalars", "array"])
@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_pickle_layouts(tmp_path, name, label_format):
    make_pickle_split_dataset(tmp_path, name, classes=(5, 4, 3), images_per_class=6, label_format=label_format)
    for split, classes in zip(("train", "val", "test"), (5, 4, 3)):
        ds = build_dataset(name, split, data_root=tmp_path)
        assert (ds.num_classes, len(ds), ds.image_shape) == (classes, classes * 6, (8, 8, 3))
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
        assert_remapped(ds.images, ds.labels, ds.class_names)
    image, label = ds[0]
    assert image.shape == (3, 84, 84) and image.dtype == torch.float32 and isinstance(label, int)


def test_mini_class_names_from_catname2label(tmp_path):
    make_pickle_split_dataset(tmp_path, "miniImageNet", catname2label=True)
    ds = build_dataset("miniimagenet", "val", data_root=tmp_path)   # names match case-insensitively
    assert ds.name == "miniImageNet"
    original = ds.images[:, 0, 0, 0]
    assert all(ds.class_names[label] == f"n{pixel:04d}" for label, pixel in zip(ds.labels, original))


@pytest.mark.parametrize("compressed", [False, True])
def test_tiered_train_is_train_plus_val(tmp_path, compressed):
    make_tiered(tmp_path, classes=(4, 3, 5), images_per_class=6, compressed=compressed)
    train = build_dataset("tieredImageNet", "train", data_root=tmp_path)
    val = build_dataset("tieredImageNet", "val", data_root=tmp_path)
    test = build_dataset("tieredImageNet", "test", data_root=tmp_path)
    assert (train.num_classes, val.num_classes, test.num_classes) == (7, 3, 5)
    assert len(train) == 42 and train.images.flags.c_contiguous
    folder = tmp_path / "tieredImageNet"
    expected = np.concatenate([np.load(folder / f"{s}_images.npz")["images"] for s in ("train", "val")])
    np.testing.assert_array_equal(train.images, expected)
    # val classes follow the 4 train classes, each part remapped in sorted order of its ids
    np.testing.assert_array_equal(train.labels[:24], train.images[:24, 0, 0, 0])
    np.testing.assert_array_equal(train.labels[24:], train.images[24:, 0, 0, 0] + 4)
    np.testing.assert_array_equal(val.labels, val.images[:, 0, 0, 0])


def test_npz_reader_equals_np_load(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(n, 5, 4, 3), dtype=np.uint8) for n in (3, 7)]
    np.savez(tmp_path / "a.npz", images=arrays[0])
    np.savez_compressed(tmp_path / "b.npz", images=arrays[1], other=np.zeros(2))
    joined = read_npz_arrays([(tmp_path / "a.npz", "images"), (tmp_path / "b.npz", "images")])
    np.testing.assert_array_equal(joined, np.concatenate(arrays))
    np.testing.assert_array_equal(read_npz_arrays([(tmp_path / "b.npz", "images")]),
                                  np.load(tmp_path / "b.npz")["images"])
    with pytest.raises(DatasetError, match="no array 'pixels'"):
        read_npz_arrays([(tmp_path / "a.npz", "pixels")])


@pytest.mark.parametrize("cropped_test", [False, True])
def test_cub(tmp_path, cropped_test, capsys):
    """val/test come from the bounding-box crops; without them only an explicit flag reads the uncropped
    images (with a warning), never a silent fallback."""
    make_cub(tmp_path, classes=(4, 3, 3), images_per_class=5, image_size=(12, 10), cropped_test=cropped_test)
    train = build_dataset("CUB", "train", data_root=tmp_path)
    if not cropped_test:
        with pytest.raises(DatasetError, match="CUB_test.*--allow_uncropped_cub"):
            build_dataset("CUB", "test", data_root=tmp_path)
    test = build_dataset("CUB", "test", data_root=tmp_path, allow_uncropped_cub=True)
    assert ("WARNING" in capsys.readouterr().err) != cropped_test
    assert (train.num_classes, len(train), train.image_shape) == (4, 20, (10, 12, 3))
    assert train.class_names == sorted(train.class_names) and train.class_names[0] == "001.Bird_1"
    assert all("CUB_200_2011/images" in p for p in train.paths)
    assert test.image_shape == ((9, 9, 3) if cropped_test else (10, 12, 3))
    assert all(("CUB_test" in p) == cropped_test for p in test.paths)
    names = np.array(test.class_names)[test.labels]
    assert all(Path(p).name.startswith(n.split(".")[1] + "_") for p, n in zip(test.paths, names))
    assert test[0][0].shape == (3, 84, 84)


def test_image_folder_any_mode_to_rgb(tmp_path):
    make_image_folder(tmp_path, "my_set", classes=(4, 3, 3), images_per_class=5)
    ds = build_dataset("my_set", "train", data_root=tmp_path, image_size=32)
    assert (ds.num_classes, len(ds), ds.class_names) == (4, 20, [f"class_{k}" for k in range(4)])
    assert ds.paths.dtype.kind == "U"
    assert all(ds.load_image(i).mode == "RGB" for i in range(5))
    assert ds[3][0].shape == (3, 32, 32)


def test_file_layout_mixed_sizes(tmp_path):
    make_image_folder(tmp_path, "mixed", mixed_sizes=True)
    assert build_dataset("mixed", "val", data_root=tmp_path).image_shape is None
    assert summarize("mixed", tmp_path)["val"]["image_shape"] is None


def test_data_root_resolution(tmp_path, monkeypatch):
    assert resolve_data_root() == Path("data")
    monkeypatch.setenv("BML_DATA_ROOT", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert resolve_data_root("elsewhere") == Path("elsewhere")
    make_pickle_split_dataset(tmp_path, "FC100")
    assert build_dataset("FC100", "test").num_classes == 4


# --- errors: DatasetError with the expected path and a pointer to the README ---------------------

def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="data root .*missing.* does not exist.*--data_root.*README, section Data"):
        build_dataset("miniImageNet", "train", data_root=tmp_path / "missing")


@pytest.mark.parametrize("name, split, expected", [
    ("miniImageNet", "test", "miniImageNet_category_split_test.pickle"), ("CIFAR-FS", "test", "test.pickle"),
    ("tieredImageNet", "test", "test_images.npz"), ("CUB", "train", "train.csv"),
])
def test_missing_file(tmp_path, name, split, expected):
    (tmp_path / name).mkdir()
    with pytest.raises(DatasetError, match=f"expected {expected} under .*{name}.*README, section Data"):
        build_dataset(name, split, data_root=tmp_path)


def test_missing_dataset_folder_and_unknown_names(tmp_path):
    with pytest.raises(DatasetError, match="expected the folder .*FC100, holding train.pickle, val.pickle, "
                                           "test.pickle"):
        build_dataset("FC100", "train", data_root=tmp_path)
    with pytest.raises(DatasetError, match="miniImageNet_category_split_val.pickle"):
        build_dataset("miniImageNet", "val", data_root=tmp_path)
    with pytest.raises(DatasetError, match="test_images.npz.*train_labels.pkl"):
        build_dataset("tieredImageNet", "test", data_root=tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*no image folder"):
        build_dataset("nope", "train", data_root=tmp_path)
    make_pickle_split_dataset(tmp_path, "FC100")
    with pytest.raises(DatasetError, match="unknown transform 'Z'"):
        build_dataset("FC100", "train", data_root=tmp_path, transform="Z")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        build_dataset("FC100", "dev", data_root=tmp_path)


def test_mixed_sizes_in_array_file(tmp_path):
    folder = tmp_path / "CIFAR-FS"
    folder.mkdir()
    data = [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)]
    write_python2_pickle(folder / "train.pickle", {"data": data, "labels": [0, 1]})
    with pytest.raises(DatasetError, match="images of mixed sizes"):
        build_dataset("CIFAR-FS", "train", data_root=tmp_path)


def test_labels_and_images_of_different_lengths(tmp_path):
    folder = tmp_path / "FC100"
    folder.mkdir()
    write_python2_pickle(folder / "val.pickle", {"data": np.zeros((3, 8, 8, 3), np.uint8), "labels": [0, 1]})
    with pytest.raises(DatasetError, match="3 images but 2 labels"):
        build_dataset("FC100", "val", data_root=tmp_path)
    make_tiered(tmp_path)
    write_python2_pickle(tmp_path / "tieredImageNet" / "test_labels.pkl", {"labels": [0, 1]})
    with pytest.raises(DatasetError, match="30 images .* but 2 labels"):
        build_dataset("tieredImageNet", "test", data_root=tmp_path)


def test_wrong_pickle_content(tmp_path):
    folder = tmp_path / "FC100"
    folder.mkdir()
    write_python2_pickle(folder / "test.pickle", {"images": np.zeros((1, 2, 2, 3), np.uint8)})
    with pytest.raises(DatasetError, match=r"expected a dict with keys \['data', 'labels'\], found \['images'\]"):
        build_dataset("FC100", "test", data_root=tmp_path)
    (folder / "val.pickle").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a valid data pickle"):
        build_dataset("FC100", "val", data_root=tmp_path)


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "CIFAR-FS"
    folder.mkdir()
    with open(folder / "train.pickle", "wb") as f:
        pickle.dump({"data": _Hostile(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetError, match=rf"refused .*'{os.system.__module__}\.system'.*nothing of the file was run"):
        build_dataset("CIFAR-FS", "train", data_root=tmp_path)
    assert not marker.exists()
    pickle.load(open(folder / "train.pickle", "rb"))   # the plain unpickler would have run it
    assert marker.exists()


def test_restricted_unpickler_reads_python3_bytes_and_numpy_scalars(tmp_path):
    payload = {"bytes": b"\x00\xff", "scalar": np.float32(1.5), "set": {1, 2}, "array": np.arange(3)}
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    loaded = load_pickle(path)
    assert loaded["bytes"] == b"\x00\xff" and loaded["scalar"] == np.float32(1.5) and loaded["set"] == {1, 2}
    np.testing.assert_array_equal(loaded["array"], np.arange(3))


# --- glyphs ---------------------------------------------------------------------------------------

def test_glyphs_split_counts_and_cache(bml_cache_dir):
    splits = {split: read_split("glyphs", split) for split in ("train", "val", "test")}
    for split, classes in zip(splits, (64, 16, 20)):
        data = splits[split]
        assert len(data.class_names) == classes and len(data.labels) == classes * glyphs.IMAGES_PER_CLASS
        assert data.images.shape[1:] == (32, 32, 3) and data.images.dtype == np.uint8
        assert np.bincount(data.labels).min() >= 12   # 15-way 5-shot 7-query works
    names = [set(data.class_names) for data in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    cache = glyphs.cache_path()
    assert cache.parent == bml_cache_dir and f"v{glyphs.GLYPHS_VERSION}" in cache.name and cache.exists()
    assert not list(bml_cache_dir.glob("*.tmp"))   # written atomically: no temp file left behind
    ds = build_dataset("glyphs", "test", train=True)
    assert (ds.transform_id, ds.image_size, ds[0][0].shape) == ("O", 32, (3, 32, 32))


def test_glyphs_cache_key_follows_the_rendering_versions(monkeypatch):
    """Another matplotlib, FreeType, Pillow or numpy renders into its own cache file."""
    import matplotlib.ft2font

    versions = glyphs.renderer_versions()
    assert versions["matplotlib_freetype"] == matplotlib.ft2font.__freetype_version__
    assert versions["numpy"] == np.__version__
    current = glyphs.cache_path()
    for name in versions:
        monkeypatch.setattr(glyphs, "renderer_versions", lambda name=name: {**versions, name: "0.0.other"})
        assert glyphs.cache_path() != current, name
    monkeypatch.setattr(glyphs, "renderer_versions", lambda: dict(versions))
    assert glyphs.cache_path() == current


def test_glyphs_deterministic_and_distinct_characters():
    cached = glyphs.load_glyphs()
    fresh = glyphs.build_glyphs()
    for key in cached:
        np.testing.assert_array_equal(cached[key], fresh[key])
    assert len(set(glyphs.CHARACTERS)) == len(glyphs.CHARACTERS) == 100
    # instances of a class really differ (fonts and distortions)
    first_class = cached["images"][cached["labels"] == 0]
    assert len({image.tobytes() for image in first_class}) == len(first_class)


# --- summary CLI -------------------------------------------------------------------------------------

@pytest.fixture
def all_layouts(tmp_path):
    for name in PICKLE_NAMES:
        make_pickle_split_dataset(tmp_path, name)
    make_tiered(tmp_path)
    make_cub(tmp_path)
    make_image_folder(tmp_path, "my_set")
    make_omniglot(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name, train", [
    ("miniImageNet", [5, 30, [8, 8, 3]]), ("CIFAR-FS", [5, 30, [8, 8, 3]]), ("FC100", [5, 30, [8, 8, 3]]),
    ("tieredImageNet", [7, 42, [8, 8, 3]]), ("CUB", [4, 20, [10, 12, 3]]), ("my_set", [4, 20, [10, 10, 3]]),
    ("omniglot", [12, 48, [28, 28, 3]]),
])
def test_summary_json_and_text(all_layouts, capsys, name, train):
    assert datasets_main(["summary", "--dataset", name, "--data_root", str(all_layouts), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary) == ["train", "val", "test"]
    assert [summary["train"][k] for k in ("classes", "images", "image_shape")] == train
    assert datasets_main(["summary", "--dataset", name, "--data_root", str(all_layouts)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(name)
    assert text.splitlines()[2].split() == ["train", str(train[0]), str(train[1]), "x".join(map(str, train[2]))]


def test_summary_glyphs(capsys):
    assert datasets_main(["summary", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {split: {key: summary[split][key] for key in ("classes", "images", "image_shape")} for split in summary} == {
        split: {"classes": c, "images": c * 60, "image_shape": [32, 32, 3]}
        for split, c in (("train", 64), ("val", 16), ("test", 20))}
    assert all(summary[split]["fingerprint"]["images"] == summary[split]["images"] for split in summary)


def test_summary_failure(tmp_path, capsys):
    assert datasets_main(["summary", "--dataset", "CUB", "--data_root", str(tmp_path), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "expected the folder" in captured.err and "README, section Data" in captured.err


def test_summary_command_exit_code_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bml.datasets", "summary", "--dataset", "miniImageNet",
                             "--data_root", str(tmp_path / "absent")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and result.stdout == ""


def test_known_names():
    assert DATASET_NAMES == ("miniImageNet", "tieredImageNet", "CIFAR-FS", "FC100", "CUB", "glyphs", "omniglot",
                             "omniglot-lake")
