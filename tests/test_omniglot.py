"""Omniglot (Vinyals split, rotation classes) and omniglot-small, on fake data."""
import numpy as np
import pytest
from fixtures import OMNIGLOT_ALPHABETS, make_image_folder, make_omniglot
from PIL import Image

from bml.datasets import DatasetError, build_dataset, dataset_defaults, read_split
from bml.datasets.omniglot import PACKAGED_SPLITS, read_split_list, split_file

CHARACTERS = {alphabet: count for _, alphabet, count in OMNIGLOT_ALPHABETS}


def test_reader_counts_and_classes(tmp_path):
    make_omniglot(tmp_path, drawers=4, image_size=21)
    for split, alphabet in (("train", "Alpha"), ("val", "Beta"), ("test", "Gamma")):
        data = read_split("omniglot", split, tmp_path)
        assert len(data.class_names) == 4 * CHARACTERS[alphabet] and len(data.labels) == 4 * 4 * CHARACTERS[alphabet]
        assert data.class_names == sorted(data.class_names) and data.class_names[0] == f"{alphabet}/character01/rot000"
        assert data.images.shape[1:] == (28, 28, 3) and data.images.dtype == np.uint8
        assert (np.bincount(data.labels) == 4).all()
    assert len(read_split("omniglot", "trainval", tmp_path).class_names) == 4 * (CHARACTERS["Alpha"] + CHARACTERS["Beta"])


def test_rotation_classes_and_pixels(tmp_path):
    make_omniglot(tmp_path, image_size=28)   # at the input size: no resampling, pixels compare exactly
    data = read_split("omniglot", "test", tmp_path)
    names = np.array(data.class_names)
    upright = data.images[data.labels == names.tolist().index("Gamma/character02/rot000")][..., 0]
    paper = np.load(tmp_path / "omniglot" / "images_evaluation.npz")["images"][1]   # Gamma is the 1st alphabet
    np.testing.assert_array_equal(upright, paper.astype(np.uint8) * 255)
    for angle in (90, 180, 270):
        rotated = data.images[data.labels == names.tolist().index(f"Gamma/character02/rot{angle:03d}")][..., 0]
        expected = [np.asarray(Image.fromarray(image).rotate(angle)) for image in upright]   # counter-clockwise
        np.testing.assert_array_equal(rotated, expected)


def test_png_tree_equals_npz(tmp_path):
    make_omniglot(tmp_path / "npz", npz=True)
    make_omniglot(tmp_path / "png", npz=False, png=True)
    for split in ("train", "test"):
        from_npz, from_png = (read_split("omniglot", split, tmp_path / kind) for kind in ("npz", "png"))
        np.testing.assert_array_equal(from_npz.images, from_png.images)
        np.testing.assert_array_equal(from_npz.labels, from_png.labels)


def test_dataset_and_defaults(tmp_path):
    make_omniglot(tmp_path)
    ds = build_dataset("Omniglot", "val", data_root=tmp_path, train=True)
    assert (ds.name, ds.transform_id, ds.image_size) == ("omniglot", "O", 28)
    assert ds[0][0].shape == (3, 28, 28)
    assert build_dataset("omniglot", "val", data_root=tmp_path, image_size=32).image_shape == (32, 32, 3)
    for name in ("omniglot", "omniglot-small"):
        defaults = dataset_defaults(name)
        assert (defaults.transform, defaults.image_size) == ("O", 28)


def test_omniglot_small_image_folder(tmp_path):
    make_image_folder(tmp_path, "omniglot-small", classes=(3, 2, 2), images_per_class=4, image_size=21,
                      modes=("1", "L"))
    ds = build_dataset("omniglot-small", "train", data_root=tmp_path, train=True)
    assert (ds.num_classes, ds.transform_id, ds.image_size) == (3, "O", 28)
    assert ds.load_image(0).mode == "RGB" and ds[0][0].shape == (3, 28, 28)


def test_packaged_split_files(tmp_path):
    counts = {split: len(read_split_list(PACKAGED_SPLITS / f"{split}.txt")) for split in ("train", "val", "test", "trainval")}
    assert counts == {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}
    assert split_file(tmp_path, "train") == PACKAGED_SPLITS / "train.txt"   # data root without splits/
    make_omniglot(tmp_path)
    assert split_file(tmp_path, "train") == tmp_path / "splits" / "omniglot" / "vinyals" / "train.txt"


def test_errors(tmp_path):
    with pytest.raises(DatasetError, match="expected the folder .*omniglot"):
        read_split("omniglot", "train", tmp_path)
    make_omniglot(tmp_path, split_files=False)    # the packaged Vinyals lists name real alphabets
    with pytest.raises(DatasetError, match="alphabets.csv has no character"):
        read_split("omniglot", "test", tmp_path)
    (tmp_path / "splits" / "omniglot" / "vinyals").mkdir(parents=True)
    (tmp_path / "splits" / "omniglot" / "vinyals" / "val.txt").write_text("Alpha/character01/rot045\n")
    with pytest.raises(DatasetError, match="expected lines `Alphabet/characterNN/rotDDD`"):
        read_split("omniglot", "val", tmp_path)
