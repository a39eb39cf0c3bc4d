"""Omniglot as Lake et al. meant it: the omniglot-lake split (nothing of the evaluation alphabets in training or
val), episodes within one group of classes, support and query by different drawers, and these rules through
validation, eval_bml.py and the Python API. Generated fixtures only (tests/fixtures.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures import (OMNIGLOT_ALPHABETS, OMNIGLOT_SPLIT_ALPHABETS, make_omniglot, make_pickle_split_dataset,
                      save_released_checkpoint)

import train_bml
from bml.cli import episode_rule
from bml.datasets import (ArrayDataset, DatasetError, EpisodeRule, EpisodeSampler, build_dataset, episode_sampler,
                          read_split)
from bml.datasets.omniglot import PACKAGED_LAKE_VAL, lake_val_file
from bml.evaluation import EmbeddingOptions, evaluate_heads, sample_episodes
from bml.models import BML
from bml.training import SettingsError, parse_training_args, train
from bml.training.run_data import check_training_episodes
from bml.training.settings import apply_recipe
from bml.training.step_plan import step_plan
from test_training import one_thread  # noqa: F401  (an autouse fixture, used here too)
from tests.test_evaluation import load_entry_script

ALPHABET_SET = {alphabet: image_set for image_set, alphabet, _ in OMNIGLOT_ALPHABETS}
DRAWERS = 6
LAKE = EpisodeRule(within_group=True, distinct_drawers=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_omniglot(tmp_path_factory.mktemp("omniglot"), drawers=DRAWERS, image_size=28)


def grouped_dataset(group_sizes=(4, 3, 6, 2), drawers: int = 5, seed: int = 0) -> ArrayDataset:
    """Classes in groups of `group_sizes`, each class drawn once by each of `drawers` drawers, images in a shuffled
    order; pixel 0 holds nothing of the answer."""
    rng = np.random.default_rng(seed)
    classes = sum(group_sizes)
    labels = np.repeat(np.arange(classes), drawers)
    drawer_ids = np.tile(np.arange(drawers) * 7 + 3, classes)      # ids need not be 0..D-1
    order = rng.permutation(len(labels))
    groups = [f"g{g}" for g, size in enumerate(group_sizes) for _ in range(size)]
    images = np.zeros((len(labels), 2, 2, 3), dtype=np.uint8)
    return ArrayDataset(images, labels[order], [f"c{c}" for c in range(classes)], class_groups=groups,
                        drawers=drawer_ids[order])


def test_lake_split_keeps_the_evaluation_alphabets_out_of_training_and_val(data_root):
    splits = {split: read_split("omniglot-lake", split, data_root) for split in ("train", "val", "test")}
    alphabets = {split: {name.split("/")[0] for name in data.class_names} for split, data in splits.items()}
    assert alphabets["val"] == set(OMNIGLOT_SPLIT_ALPHABETS["val"])
    assert alphabets["train"] == {a for a, s in ALPHABET_SET.items() if s == "images_background"} - alphabets["val"]
    assert alphabets["test"] == {a for a, s in ALPHABET_SET.items() if s == "images_evaluation"}
    # No evaluation image reaches training or val, in any rotation: compare the pixels themselves.
    evaluation = np.load(data_root / "omniglot" / "images_evaluation.npz")["images"].astype(np.uint8) * 255
    seen = {np.rot90(image, turns).tobytes() for image in evaluation.reshape(-1, 28, 28) for turns in range(4)}
    for split in ("train", "val"):
        for rotations in (False, True):
            data = read_split("omniglot-lake", split, data_root, rotation_classes=rotations and split == "train")
            assert not seen & {image[..., 0].tobytes() for image in data.images}
    assert all(name.endswith("rot000") for data in splits.values() for name in data.class_names)
    assert {image[..., 0].tobytes() for image in splits["test"].images} <= seen


def test_rotation_classes_only_in_training(data_root):
    upright = read_split("omniglot-lake", "train", data_root)
    rotated = read_split("omniglot-lake", "train", data_root, rotation_classes=True)
    assert len(rotated.class_names) == 4 * len(upright.class_names) and len(rotated.labels) == 4 * len(upright.labels)
    assert {name.rsplit("/", 1)[1] for name in rotated.class_names} == {"rot000", "rot090", "rot180", "rot270"}
    with pytest.raises(DatasetError, match="cannot make rotations"):
        read_split("omniglot", "train", data_root, rotation_classes=True)


def test_groups_and_drawers_recorded_the_same_from_npz_and_png(tmp_path):
    for kind in ("npz", "png"):
        make_omniglot(tmp_path / kind, drawers=DRAWERS, npz=kind == "npz", png=kind == "png")
    for name in ("omniglot-lake", "omniglot"):
        from_npz, from_png = (read_split(name, "test", tmp_path / kind) for kind in ("npz", "png"))
        assert from_npz.class_groups == from_png.class_groups == [n.split("/")[0] for n in from_npz.class_names]
        np.testing.assert_array_equal(from_npz.drawers, from_png.drawers)
        for label in range(len(from_npz.class_names)):   # every character drawn once by each drawer
            assert sorted(from_npz.drawers[from_npz.labels == label]) == list(range(DRAWERS))
    dataset = build_dataset("omniglot-lake", "test", tmp_path / "npz")
    data = read_split("omniglot-lake", "test", tmp_path / "npz")
    assert dataset.class_groups == data.class_groups
    np.testing.assert_array_equal(dataset.drawers, data.drawers)


def test_lake_val_alphabets_list(data_root, tmp_path):
    assert lake_val_file(data_root) == data_root / "splits" / "omniglot" / "lake" / "val_alphabets.txt"
    assert lake_val_file(tmp_path) == PACKAGED_LAKE_VAL
    packaged = [line for line in PACKAGED_LAKE_VAL.read_text().splitlines() if line and not line.startswith("#")]
    assert packaged == ["Armenian", "Bengali", "Early_Aramaic", "Futurama"]
    make_omniglot(tmp_path, split_files=False)   # the packaged list names real alphabets, the fixture has none
    with pytest.raises(DatasetError, match="must be one of the background alphabets"):
        read_split("omniglot-lake", "train", tmp_path)


def test_within_group_episodes_hold_one_group_and_reach_every_group_big_enough():
    dataset = grouped_dataset()
    groups = np.array(dataset.class_groups)
    episodes = episode_sampler(dataset, 3, 1, 2, 400, rule=EpisodeRule(within_group=True)).sample()
    episode_groups = groups[dataset.labels[episodes]]
    assert (episode_groups == episode_groups[:, :1]).all()
    assert set(episode_groups[:, 0]) == {"g0", "g1", "g2"}               # g3 has 2 classes: never 3-way
    classes = dataset.labels[episodes].reshape(400, 3, 3)
    assert all(len(set(row[0])) == 3 and (row == row[0]).all() for row in classes)
    with pytest.raises(DatasetError, match="largest group"):
        episode_sampler(dataset, 7, 1, 1, 4, rule=EpisodeRule(within_group=True))


def test_distinct_drawers_support_and_query_never_share_a_drawer():
    dataset = grouped_dataset()
    way, shot, query = 4, 2, 2
    episodes = episode_sampler(dataset, way, shot, query, 300, rule=LAKE).sample()
    drawers = dataset.drawers[episodes].reshape(300, shot + query, way)
    assert (drawers == drawers[:, :, :1]).all()                         # one drawer per support / query position
    assert all(len(set(row[:, 0])) == shot + query for row in drawers)   # and all positions' drawers differ
    assert len(np.unique(drawers[:, 0, 0])) == 5                         # every drawer is used
    labels = dataset.labels[episodes].reshape(300, shot + query, way)
    assert (labels == labels[:, :1]).all()                              # still shot-major, one class per column
    with pytest.raises(DatasetError, match=r"fewer than shot \+ query = 6"):   # 5 drawers: 5 images a class
        episode_sampler(dataset, 2, 3, 3, 1, rule=LAKE)


def test_the_free_rule_draws_the_sampler_s_own_episodes():
    dataset = grouped_dataset()
    free = episode_sampler(dataset, 4, 1, 3, 50, seed=5).sample()
    np.testing.assert_array_equal(free, EpisodeSampler(dataset.labels, 4, 1, 3, 50, seed=5).sample())
    assert not np.array_equal(free, episode_sampler(dataset, 4, 1, 3, 50, seed=5, rule=LAKE).sample())


def test_rules_a_data_set_cannot_follow_are_errors_naming_what_it_lacks():
    plain = ArrayDataset(np.zeros((20, 2, 2, 3), np.uint8), np.repeat(np.arange(4), 5), list("abcd"), name="pets",
                         split="test")
    with pytest.raises(DatasetError, match="pets test declares no groups"):
        episode_sampler(plain, 2, 1, 1, 3, rule=EpisodeRule(within_group=True))
    with pytest.raises(DatasetError, match="does not record who drew"):
        episode_sampler(plain, 2, 1, 1, 3, rule=EpisodeRule(distinct_drawers=True))
    labels, drawers = np.repeat(np.arange(3), 3), np.array([0, 1, 2, 0, 1, 1, 0, 1, 2])
    with pytest.raises(DatasetError, match="class 1 has 2 images by drawer 1"):
        EpisodeSampler(labels, 2, 1, 1, 2, drawers=drawers)
    with pytest.raises(DatasetError, match="more than one group"):
        EpisodeSampler(labels, 2, 1, 1, 2, groups=np.array([0, 0, 1, 1, 1, 1, 2, 2, 2]))


def test_evaluate_heads_scores_the_rule_s_episodes_from_one_embedding_pass(data_root, monkeypatch):
    dataset = build_dataset("omniglot-lake", "test", data_root)
    drawn = {}
    real = sample_episodes

    def recording(*args, **kwargs):
        drawn["episodes"] = real(*args, **kwargs)
        return drawn["episodes"]

    monkeypatch.setattr("bml.evaluation.protocol.sample_episodes", recording)
    torch.manual_seed(0)
    model = BML(num_classes=3, width=0.125).eval()
    results = evaluate_heads(model, dataset, 3, 1, 2, episodes=30, seeds=[0, 1], rule=LAKE,
                             options=EmbeddingOptions(progress=False))
    episodes = drawn["episodes"]
    assert episodes.shape == (60, 9)
    groups = np.array(dataset.class_groups)[dataset.labels[episodes]]
    assert (groups == groups[:, :1]).all()
    drawers = dataset.drawers[episodes]
    assert not any(np.isin(queries, support).any() for support, queries in zip(drawers[:, :3], drawers[:, 3:]))
    assert set(results["proto"]) >= {"global", "local", "bml"}


def test_eval_bml_within_group_by_distinct_drawers(data_root, tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = save_released_checkpoint(tmp_path / "bml.pth", BML(num_classes=3, width=0.125),
                                          dataset="omniglot-lake", model="bml", image_size=28, transform="O")
    eval_bml = load_entry_script()
    common = ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--n_ways", "3", "--n_shots", "1",
              "--n_queries", "2", "--episodes", "10", "--seeds", "0", "--num_workers", "0", "--no_progress",
              "--output_dir", str(tmp_path)]
    assert eval_bml.main(eval_bml.get_args_parser().parse_args([*common, "--within_group", "--distinct_drawers"])) == 0
    saved = json.loads((tmp_path / "omniglot-lake_within_group_distinct_drawers_bml_eval_results_1shot.json")
                       .read_text())
    assert saved["within_group"] and saved["distinct_drawers"] and saved["way"] == 3
    assert eval_bml.main(eval_bml.get_args_parser().parse_args(common)) == 0       # across groups: its own file
    assert not json.loads((tmp_path / "omniglot-lake_bml_eval_results_1shot.json").read_text())["within_group"]
    capsys.readouterr()
    cifar = make_pickle_split_dataset(tmp_path / "cifar", "CIFAR-FS", classes=(6, 5, 5), images_per_class=16,
                                      image_size=32)
    ungrouped = [*common, "--dataset", "CIFAR-FS", "--data_root", str(cifar), "--within_group"]
    assert eval_bml.main(eval_bml.get_args_parser().parse_args(ungrouped)) == 1
    assert "CIFAR-FS test declares no groups" in capsys.readouterr().err


def test_training_validates_within_alphabets_by_distinct_drawers(data_root, tmp_path, capsys):
    argv = ["--dataset", "omniglot-lake", "--data_root", str(data_root), "--rotation_classes", "--width", "0.125",
            "--n_train_ways", "5", "--n_train_shots", "1", "--n_train_queries", "1", "--epochs", "1",
            "--episodes_per_epoch", "2", "--eval_freq", "1", "--val_episodes", "8", "--n_ways", "2",
            "--n_shots", "1", "--n_queries", "2", "--within_group", "--distinct_drawers", "--num_workers", "0",
            "--run_folder", str(tmp_path / "run")]
    args = parse_training_args(train_bml.get_args_parser(), argv)
    assert episode_rule(args) == LAKE
    assert train(args).exit_code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["within_group"] and config["distinct_drawers"] and config["rotation_classes"]
    assert config["num_classes"] == 4 * 3          # Alpha's 3 characters in 4 rotations
    out = capsys.readouterr().out
    assert "episodes of val (within group distinct drawers)" in out
    assert "--n_ways 2 --within_group --distinct_drawers" in out        # the evaluation it suggests follows the rule
    wide = parse_training_args(train_bml.get_args_parser(), [*argv[:-2], "--n_ways", "3", "--run_folder",
                                                               str(tmp_path / "wide")])
    assert train(wide).exit_code != 0        # val alphabet Beta has 2 characters: refused before any step
    assert not (tmp_path / "wide" / "last.pth").exists()


def test_training_episodes_within_one_group(data_root):
    argv = ["--dataset", "omniglot-lake", "--data_root", str(data_root), "--n_train_ways", "3", "--n_train_shots",
            "1", "--n_train_queries", "2", "--episodes_per_epoch", "40", "--train_within_group"]
    def settings(flags: list[str]):
        args = apply_recipe(parse_training_args(train_bml.get_args_parser(), flags))
        args.model, args.world_size, args.episodes_per_process = "bml", 1, 1
        return args

    args, dataset = settings(argv), grouped_dataset()
    plan = step_plan(args, dataset, epoch=1, rank=0)
    groups = np.array(dataset.class_groups)[dataset.labels[plan.reshape(40, -1)]]
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 3
    free = step_plan(settings(argv[:-1]), dataset, epoch=1, rank=0)
    assert not (np.array(dataset.class_groups)[dataset.labels[free.reshape(40, -1)]] == groups[:, :1]).all()
    args.n_train_ways = 7
    with pytest.raises(SettingsError, match="lower --n_train_ways or leave out --train_within_group"):
        check_training_episodes(args, dataset)


def test_affine_transform_is_refused_on_the_device_before_any_work(data_root, tmp_path, capsys):
    argv = ["--dataset", "omniglot-lake", "--data_root", str(data_root), "--transform", "K", "--augment", "device",
            "--run_folder", str(tmp_path / "run")]
    assert train(parse_training_args(train_bml.get_args_parser(), argv)).exit_code != 0
    assert "--transform K's affine distortions run on the host only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
