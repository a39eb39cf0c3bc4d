"""Evaluation: the cached protocol equals embedding every episode afresh, and the CLI writes its files."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from bml.datasets import NORMALIZATION, ArrayDataset, DatasetError, build_dataset, build_transform, episode_labels
from bml.datasets.device_augment import EvalCrops, to_model_input
from bml.evaluation import (CheckpointIdentity, EmbeddingOptions, build_evaluation_dataset, embed_dataset,
                            evaluate_episodes, parse_seed_range, results_paths, sample_episodes, score_episodes,
                            write_results)
from bml.models import BML, BaselineGlobal
from bml.scoring import COMBINED, SCALED
from fixtures import make_cub, make_image_folder, make_pickle_split_dataset, save_released_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WAY, QUERY, IMAGE_SIZE, CLASSES, PER_CLASS = 5, 15, 32, 8, 20
QUIET = EmbeddingOptions(progress=False)
EXACT = EmbeddingOptions(storage_dtype=torch.float32, progress=False)


def load_entry_script():
    spec = importlib.util.spec_from_file_location("eval_bml", ROOT / "eval_bml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset() -> ArrayDataset:
    """Half class template, half noise: a random-init model then scores well above chance, not 100%."""
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (CLASSES, IMAGE_SIZE, IMAGE_SIZE, 3))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    noise = rng.integers(0, 256, (len(labels), IMAGE_SIZE, IMAGE_SIZE, 3))
    images = (0.5 * templates[labels] + 0.5 * noise).astype(np.uint8)
    return ArrayDataset(images, labels, [f"class{c}" for c in range(CLASSES)],
                        transform=build_transform("D", IMAGE_SIZE))


@pytest.fixture(scope="module")
def model() -> BML:
    torch.manual_seed(0)
    return BML(num_classes=CLASSES, width=0.125).eval()


@torch.no_grad()
def per_episode_accuracies(model, dataset, episodes: np.ndarray, shot: int) -> dict[str, np.ndarray]:
    """The original protocol, written independently: run the model on each episode's images, average
    each class's supports, predict the nearest prototype by explicit squared differences; for the
    scaled vote, divide each view's logits by the mean squared distance over all pairs of prototypes."""
    accuracies = {name: [] for name in (*model.view_names, COMBINED, SCALED)}
    for episode in episodes:
        images = torch.stack([dataset[int(i)][0] for i in episode])
        labels = episode_labels(WAY, len(episode) - WAY * shot)
        summed = scaled = 0
        for name, embedding in zip(model.view_names, model.embed(images)):
            support, query = embedding[:WAY * shot], embedding[WAY * shot:]
            prototypes = torch.stack([support[c::WAY].mean(0) for c in range(WAY)])
            logits = -((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
            accuracies[name].append((logits.argmax(1) == labels).double().mean().item() * 100)
            summed = summed + logits
            pairs = ((prototypes[:, None, :] - prototypes[None]) ** 2).sum(-1)
            scaled = scaled + logits / (pairs.sum() / (WAY * (WAY - 1)))
        accuracies[COMBINED].append((summed.argmax(1) == labels).double().mean().item() * 100)
        accuracies[SCALED].append((scaled.argmax(1) == labels).double().mean().item() * 100)
    return {name: np.array(values) for name, values in accuracies.items()}


def correct_queries(accuracies: np.ndarray) -> np.ndarray:
    """Accuracies (%) as counts of correct queries, compared exactly whatever the float rounding."""
    return np.rint(accuracies * WAY * QUERY / 100).astype(int)


@pytest.mark.parametrize("shot", [1, 5])
def test_cached_scoring_equals_per_episode_protocol(model, dataset, shot):
    episodes = sample_episodes(dataset.labels, WAY, shot, QUERY, episodes=15, seeds=[0, 1])
    cache = embed_dataset(model, dataset, EmbeddingOptions(batch_size=64, storage_dtype=torch.float32,
                                                                   progress=False))
    cached = score_episodes(cache, episodes, WAY, shot, names=model.view_names, progress=False)
    reference = per_episode_accuracies(model, dataset, episodes, shot)
    assert set(cached) == {"global", "local", COMBINED, SCALED}
    assert 30 < reference[COMBINED].mean() < 100, "the fixture should be neither chance nor trivial"
    for name in reference:
        np.testing.assert_array_equal(correct_queries(cached[name]), correct_queries(reference[name]), err_msg=name)


def test_scaled_vote_ignores_the_scale_of_a_view(model, dataset):
    """Multiplying one view's embeddings by 100 makes its distances 10,000 times larger: the published sum
    then follows that view alone, the scaled vote does not change."""
    episodes = sample_episodes(dataset.labels, WAY, 1, QUERY, episodes=40, seeds=[0])
    cache = embed_dataset(model, dataset, EXACT)
    plain = score_episodes(cache, episodes, WAY, 1, names=model.view_names, progress=False)
    louder = score_episodes([cache[0] * 100, cache[1]], episodes, WAY, 1, names=model.view_names, progress=False)
    np.testing.assert_array_equal(correct_queries(louder[SCALED]), correct_queries(plain[SCALED]))
    assert (plain[COMBINED] != plain["global"]).any() and (louder[COMBINED] == louder["global"]).all()


def test_float16_storage_agrees_closely(model, dataset):
    """float16 keeps 11 significant bits: a distance moves by ~1e-3 relative, so only queries whose two
    nearest prototypes are that close flip. This random-init fixture has many such close calls (about
    5% of episodes); each flips one query, in either direction, and the mean barely moves."""
    episodes = sample_episodes(dataset.labels, WAY, 1, QUERY, episodes=200, seeds=[0])
    exact = score_episodes(embed_dataset(model, dataset, EXACT), episodes, WAY, 1, progress=False)
    half = score_episodes(embed_dataset(model, dataset, QUIET), episodes, WAY, 1, progress=False)
    one_query = 100 / (WAY * QUERY)
    for name in exact:
        difference = np.abs(half[name] - exact[name])
        assert difference.max() <= one_query + 1e-9 and (difference > 0).mean() <= 0.1, name
        assert abs(half[name].mean() - exact[name].mean()) < 0.1, name


def test_chunking_device_and_memory_map_do_not_change_scores(model, dataset):
    episodes = sample_episodes(dataset.labels, WAY, 5, QUERY, episodes=30, seeds=[3])
    in_memory = embed_dataset(model, dataset, EmbeddingOptions(batch_size=50, progress=False))
    mapped = embed_dataset(model, dataset, EmbeddingOptions(batch_size=50, max_memory_gb=0, progress=False))
    assert not isinstance(in_memory[0].numpy(), np.memmap)
    torch.testing.assert_close(mapped, in_memory, rtol=0, atol=0)
    whole = score_episodes(in_memory, episodes, WAY, 5, progress=False)
    chunked = score_episodes(mapped, episodes, WAY, 5, chunk_mb=1, progress=False)
    for name in whole:
        np.testing.assert_array_equal(whole[name], chunked[name])


@pytest.mark.parametrize("transform_id", ["A", "B", "D", "O"])
def test_test_images_travel_as_uint8_and_give_the_same_inputs(tmp_path, model, transform_id):
    """A data set built with its test transform is loaded as uint8 crops and normalised on the device:
    bit-identical model inputs to the float transform's (images of mixed sizes included), so the same
    embeddings; a data set whose transform is not known to be the test one keeps the float path."""
    make_image_folder(tmp_path, "mixed", mixed_sizes=True, image_size=40)
    dataset = build_dataset("mixed", "test", data_root=tmp_path, image_size=32, transform=transform_id)
    crops = EvalCrops(dataset)
    assert EvalCrops.applies_to(dataset) and crops[0][0].dtype == torch.uint8
    for index in range(len(dataset)):
        assert torch.equal(to_model_input(crops[index][0][None], crops.mean, crops.std)[0], dataset[index][0])
    uint8_path = embed_dataset(model, dataset, EmbeddingOptions(batch_size=4, storage_dtype=torch.float32))
    dataset.train = None
    assert not EvalCrops.applies_to(dataset)
    float_path = embed_dataset(model, dataset, EmbeddingOptions(batch_size=4, storage_dtype=torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(uint8_path, float_path))


def test_cross_domain_uint8_inputs_keep_the_model_normalisation(tmp_path):
    """Cross-domain (a miniImageNet model on CIFAR-FS): the uint8 crops are CIFAR-FS's test geometry and are
    normalised with the model's statistics, as the float transform does; a transform that is not the test
    transform (another resize) keeps the float path."""
    make_pickle_split_dataset(tmp_path, "CIFAR-FS", classes=(5, 5, 5), images_per_class=4, image_size=8)
    dataset = build_evaluation_dataset("miniImageNet", "test", tmp_path, image_size=32, test_dataset="CIFAR-FS")
    crops = EvalCrops(dataset)
    assert EvalCrops.applies_to(dataset) and (crops.mean, crops.std) == NORMALIZATION["A"]
    assert torch.equal(to_model_input(crops[3][0][None], crops.mean, crops.std)[0], dataset[3][0])
    dataset.transform = T.Compose([T.Resize((16, 16)), *dataset.transform.transforms[1:]])
    assert not EvalCrops.applies_to(dataset)


def test_evaluate_episodes_summarises_seeds_and_restores_training_mode(model, dataset):
    model.train()
    results = evaluate_episodes(model, dataset, WAY, 1, QUERY, episodes=40, seeds=[0, 1], options=QUIET)
    assert model.training
    model.eval()
    assert list(results) == ["global", "local", COMBINED, SCALED]
    for summary in results.values():
        assert list(summary["per_seed"]) == [0, 1]
        assert summary["acc"] == pytest.approx(np.mean([s["acc"] for s in summary["per_seed"].values()]))
        assert 0 < summary["ci95"] < 10
    again = evaluate_episodes(model, dataset, WAY, 1, QUERY, episodes=40, seeds=[1], options=QUIET)
    assert again[COMBINED]["per_seed"][1] == results[COMBINED]["per_seed"][1]


def test_baseline_has_one_view_and_its_prediction_is_the_combined_one(dataset):
    torch.manual_seed(0)
    baseline = BaselineGlobal(num_classes=CLASSES, width=0.125).eval()
    results = evaluate_episodes(baseline, dataset, WAY, 5, QUERY, episodes=20, seeds=[0], options=QUIET)
    assert list(results) == ["global", COMBINED]
    assert results["global"] == results[COMBINED]


def test_too_many_shots_fail_before_embedding(model, dataset):
    with pytest.raises(DatasetError, match="fewer than shot"):
        evaluate_episodes(model, dataset, WAY, PER_CLASS, QUERY, episodes=5, seeds=[0], options=QUIET)


def test_cross_domain_keeps_test_geometry_and_model_normalisation(tmp_path):
    make_pickle_split_dataset(tmp_path, "CIFAR-FS", classes=(5, 5, 5), images_per_class=4, image_size=8)
    dataset = build_evaluation_dataset("miniImageNet", "test", tmp_path, image_size=32, test_dataset="CIFAR-FS")
    resize, _, normalize = dataset.transform.transforms
    assert isinstance(resize, T.Resize) and resize.size == (32, 32)
    assert tuple(normalize.mean) == NORMALIZATION["A"][0] and tuple(normalize.std) == NORMALIZATION["A"][1]
    assert dataset[0][0].shape == (3, 32, 32)


def test_seed_ranges():
    assert parse_seed_range("0-3") == [0, 1, 2, 3] and parse_seed_range("7") == [7]
    for bad in ("a", "3-1", "1-b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seed_range(bad)


def test_results_file_is_replaced(tmp_path):
    results = {COMBINED: {"acc": 50.0, "ci95": 1.0, "per_seed": {0: {"acc": 40.0, "ci95": 1.0},
                                                                  1: {"acc": 60.0, "ci95": 1.0}}}}
    (tmp_path / "model.pth").write_bytes(b"weights")
    checkpoint = CheckpointIdentity.of(tmp_path / "model.pth")
    for _ in range(2):
        text_path, json_path, _ = write_results(results, "glyphs", results_paths("glyphs", 1, checkpoint, tmp_path),
                                                checkpoint)
    assert text_path.read_text().splitlines() == [
        f"# checkpoint: {tmp_path / 'model.pth'}", f"# checkpoint sha256: {checkpoint.sha256} (7 bytes)",
        "0: 40.0000", "1: 60.0000", "==> Mean ACC on glyphs: 50.0000"]
    assert json.loads(json_path.read_text())["results"][COMBINED]["per_seed"]["1"]["acc"] == 60.0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """CIFAR-FS layout, test split: 5 classes x 16 images (1-shot 15-query needs 16)."""
    return make_pickle_split_dataset(tmp_path_factory.mktemp("data"), "CIFAR-FS", classes=(6, 5, 5),
                                     images_per_class=16, image_size=32)


def test_eval_bml_sh_writes_results_and_json(tmp_path, data_root):
    torch.manual_seed(0)
    checkpoint = save_released_checkpoint(tmp_path / "bml.pth", BML(num_classes=6, width=0.125),
                                          dataset="CIFAR-FS", backbone="Res12")
    environment = {**os.environ, "BML_DATA_ROOT": str(data_root), "PYTHON": sys.executable}
    completed = subprocess.run(
        ["bash", str(ROOT / "eval_bml.sh"), "CIFAR-FS", "A", str(checkpoint), "1", "--episodes", "20",
         "--seeds", "0", "1", "--image_size", "32", "--num_workers", "0", "--output_dir", str(tmp_path / "out"),
         "--no_progress"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in (tmp_path / "out" / "CIFAR-FS_bml_eval_results_1shot.txt").read_text().splitlines()
             if not line.startswith("#")]
    assert [line.split(":")[0] for line in lines[:2]] == ["0", "1"]
    assert lines[2].startswith("==> Mean ACC on CIFAR-FS: ")
    saved = json.loads((tmp_path / "out" / "CIFAR-FS_bml_eval_results_1shot.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["episodes"] == 20 and saved["image_size"] == 32
    assert set(saved["results"]) == {"global", "local", COMBINED, SCALED}
    assert float(lines[2].split()[-1]) == pytest.approx(saved["results"][COMBINED]["acc"], abs=1e-4)


def test_eval_bml_main_evaluates_a_baseline_at_its_recorded_size(tmp_path, data_root):
    torch.manual_seed(0)
    checkpoint = save_released_checkpoint(tmp_path / "global.pth", BaselineGlobal(num_classes=6, width=0.125),
                                          dataset="CIFAR-FS", model="global", image_size=32)
    eval_bml = load_entry_script()
    args = eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--n_shots", "1", "--episodes", "10",
         "--seeds", "0-2", "--num_workers", "0", "--output_dir", str(tmp_path), "--json",
         str(tmp_path / "r.json"), "--no_progress"])
    assert eval_bml.main(args) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["model"] == "global" and saved["image_size"] == 32 and saved["seeds"] == [0, 1, 2]
    assert list(saved["results"]) == ["global", COMBINED]


@pytest.mark.parametrize("flags, message", [
    (["--ckp_path", "missing.pth", "--dataset", "CIFAR-FS"], "checkpoint not found"),
    (["--dataset", "no_such_dataset"], "unknown dataset"),
    (["--dataset", "CIFAR-FS", "--n_shots", "20"], "fewer than shot + query"),
])
def test_eval_bml_errors_are_one_line_and_exit_1(tmp_path, data_root, capsys, flags, message):
    checkpoint = save_released_checkpoint(tmp_path / "bml.pth", BML(num_classes=6, width=0.125))
    eval_bml = load_entry_script()
    args = eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--image_size", "32",
         "--num_workers", "0", "--output_dir", str(tmp_path), "--no_progress", *flags])
    assert eval_bml.main(args) == 1
    assert message in capsys.readouterr().err


def test_eval_bml_refuses_a_checkpoint_that_does_not_match(tmp_path, data_root, capsys):
    weights = BML(num_classes=6, width=0.125).state_dict()
    del weights["local_view.layer.0.conv1.weight"]
    checkpoint = save_released_checkpoint(tmp_path / "broken.pth", weights)
    eval_bml = load_entry_script()
    args = eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--dataset", "CIFAR-FS", "--data_root", str(data_root), "--no_progress"])
    assert eval_bml.main(args) == 1
    assert "missing (1): local_view.layer.0.conv1.weight" in capsys.readouterr().err


def test_eval_bml_cub_without_crops_stops_unless_asked_and_records_it(tmp_path, capsys):
    make_cub(tmp_path / "data", classes=(4, 3, 3), images_per_class=5)
    checkpoint = save_released_checkpoint(tmp_path / "bml.pth", BML(num_classes=4, width=0.125), dataset="CUB")
    eval_bml = load_entry_script()
    flags = ["--ckp_path", str(checkpoint), "--data_root", str(tmp_path / "data"), "--image_size", "32",
             "--n_ways", "3", "--n_shots", "1", "--n_queries", "2", "--episodes", "5", "--seeds", "0",
             "--num_workers", "0", "--output_dir", str(tmp_path), "--json", str(tmp_path / "r.json"), "--no_progress"]
    assert eval_bml.main(eval_bml.get_args_parser().parse_args(flags)) == 1
    assert "--allow_uncropped_cub" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    assert eval_bml.main(eval_bml.get_args_parser().parse_args([*flags, "--allow_uncropped_cub"])) == 0
    assert "WARNING" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["uncropped_cub"] is True


def test_eval_bml_off_a_terminal_says_its_progress_in_tenths(tmp_path, data_root):
    """Embedding and scoring off a terminal (nohup, batch jobs): lines per tenth of the work on stderr, no bars."""
    torch.manual_seed(0)
    checkpoint = save_released_checkpoint(tmp_path / "bml.pth", BML(num_classes=6, width=0.125),
                                          dataset="CIFAR-FS", backbone="Res12")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "eval_bml.py"), "--ckp_path", str(checkpoint), "--data_root", str(data_root),
         "--n_shots", "1", "--episodes", "20", "--seeds", "0", "--image_size", "32", "--num_workers", "0",
         "--embed_batch_size", "8", "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "embedding" in completed.stderr and "scoring" in completed.stderr
    assert "\r" not in completed.stderr   # no progress bar redrawn in place
