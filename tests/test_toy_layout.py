"""A data set layout is one entry of `DATASETS`: a toy layout added there alone is read by `read_split`, built by
`build_dataset`, summarised, named in the generated help and messages, and gets its options and defaults."""

import numpy as np
import pytest

from bml.datasets import (DATASETS, ArrayDataset, DatasetError, DatasetLayout, ReadOptions, SplitData, build_dataset,
                          canonical_name, dataset_defaults, dataset_flag_help, dataset_names, describe_datasets,
                          read_split, summarize)
from bml.cli import dataset_parser
from bml.datasets.__main__ import main as datasets_main

CLASSES, PER_CLASS, STORED = 3, 4, 12
CALLS: list[tuple[str, ReadOptions]] = []


def read_toy(folder, split: str, options: ReadOptions) -> SplitData:
    """`<folder>/<split>.npy`: uint8 images, CLASSES classes of PER_CLASS images in order."""
    CALLS.append((split, options))
    images = np.load(folder / f"{split}.npy", mmap_mode="r")
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    return SplitData(labels=labels, class_names=[f"shape{c}" for c in range(CLASSES)],
                     images=np.asarray(images) if options.load_images else None, image_shape=images.shape[1:])


TOY = DatasetLayout("coloured squares, three classes", read_toy, "D", 16, ("{train,val,test}.npy",))


@pytest.fixture
def toy_root(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "ToySquares", TOY)
    CALLS.clear()
    rng = np.random.default_rng(0)
    (tmp_path / "ToySquares").mkdir()
    for split in ("train", "val", "test"):
        np.save(tmp_path / "ToySquares" / f"{split}.npy",
                rng.integers(0, 256, (CLASSES * PER_CLASS, STORED, STORED, 3), dtype=np.uint8))
    return tmp_path


def test_build_dataset_reads_the_toy_layout_with_its_defaults(toy_root):
    assert canonical_name("toysquares") == "ToySquares"
    dataset = build_dataset("toysquares", "train", data_root=toy_root, train=True)
    assert isinstance(dataset, ArrayDataset) and dataset.name == "ToySquares" and dataset.num_classes == CLASSES
    assert (dataset.transform_id, dataset.image_size, dataset[0][0].shape) == ("D", 16, (3, 16, 16))
    assert (dataset_defaults("ToySquares").transform, dataset_defaults("ToySquares").image_size) == ("D", 16)
    assert CALLS == [("train", ReadOptions(image_size=16))]


def test_read_split_passes_the_options_through(toy_root):
    data = read_split("ToySquares", "val", toy_root, image_size=20, allow_uncropped_cub=True)
    assert data.images.shape == (CLASSES * PER_CLASS, STORED, STORED, 3)
    assert CALLS == [("val", ReadOptions(image_size=20, allow_uncropped=True))]
    with pytest.raises(DatasetError, match="unknown split 'dev' for ToySquares"):
        read_split("ToySquares", "dev", toy_root)


def test_summarize_asks_for_metadata_only(toy_root, capsys):
    expected = {"classes": CLASSES, "images": CLASSES * PER_CLASS, "image_shape": [STORED, STORED, 3]}
    summary = summarize("ToySquares", toy_root)
    assert {split: {key: entry[key] for key in expected} for split, entry in summary.items()} == {
        split: expected for split in ("train", "val", "test")}
    assert all(entry["fingerprint"]["images"] == CLASSES * PER_CLASS for entry in summary.values())
    assert all(not options.load_images for _, options in CALLS)
    assert datasets_main(["summary", "--dataset", "toysquares", "--data_root", str(toy_root)]) == 0
    assert capsys.readouterr().out.startswith("ToySquares (data root")


def test_the_help_and_the_messages_name_the_toy_layout(toy_root, tmp_path_factory, capsys):
    assert dataset_names()[-1] == "ToySquares" and "omniglot-lake, ToySquares, or the name of an image folder" in \
        dataset_flag_help()
    assert "  ToySquares: coloured squares, three classes\n      <data_root>/ToySquares/ holds {train,val,test}.npy" \
        in describe_datasets()
    with pytest.raises(SystemExit):
        datasets_main(["summary", "--help"])
    assert "ToySquares: coloured squares" in capsys.readouterr().out
    assert "omniglot-lake,ToySquares,orthename" in "".join(dataset_parser().format_help().split())   # wraps anywhere
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DatasetError, match="expected the folder .*ToySquares for ToySquares, holding "
                                           r"\{train,val,test\}.npy"):
        read_split("ToySquares", "train", empty)
    with pytest.raises(DatasetError, match="unknown dataset 'nope': not one of .*omniglot-lake, ToySquares"):
        read_split("nope", "train", empty)
