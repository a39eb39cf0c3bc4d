"""Calibration: the temperature fit, the ECE, the rejection curve, the checkpoint record, and a tiny glyphs
model trained here (its checkpoints calibrated at the end of training, `eval_bml.py --calibrate`, the
predictor applying the temperature)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_bml
import train_bml
from bml import FewShotClassifier
from bml.calibration import (CalibrationMeter, expected_calibration_error, fit_temperature, rejection_curve,
                             temperature_nll)
from bml.checkpoint import (CheckpointError, model_config, model_from_state, model_state_dict, read_calibration,
                            read_checkpoint, with_calibration)
from bml.evaluation import EmbeddingOptions, build_evaluation_dataset, evaluate_episodes
from bml.scoring import COMBINED, SCALED
from fixtures import save_released_checkpoint

VOTES = {"global", "local", COMBINED, SCALED}
TRAIN = ["--dataset", "glyphs", "--width", "0.125", "--image_size", "32", "--n_train_ways", "5",
         "--n_train_shots", "2", "--n_train_queries", "3", "--num_workers", "0", "--print_freq", "100",
         "--epochs", "2", "--episodes_per_epoch", "12", "--eval_freq", "2", "--val_episodes", "60"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A tiny glyphs model, trained on one thread (on a shared CPU, spinning OpenMP threads slow it down)."""
    folder, threads = tmp_path_factory.mktemp("calibration") / "run", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_bml.main(train_bml.get_args_parser().parse_args([*TRAIN, "--run_folder", str(folder)])) == 0
    finally:
        torch.set_num_threads(threads)
    return folder


def sampled_labels(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Labels drawn from softmax(logits / T): data that T calibrates exactly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)


@pytest.mark.parametrize("temperature", [0.3, 4.0, 60.0])
def test_fitted_temperature_recovers_the_one_that_generated_the_labels(temperature):
    logits = torch.randn(8000, 5, generator=torch.Generator().manual_seed(1)) * 20
    labels = sampled_labels(logits, temperature, seed=2)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.08)
    nll = temperature_nll(logits, labels, torch.tensor([fitted * 0.8, fitted, fitted * 1.25]))
    assert nll[1] < nll[0] and nll[1] < nll[2]
    assert expected_calibration_error(logits, labels, fitted) < 0.03
    with pytest.raises(ValueError, match="N, C"):
        fit_temperature(logits, labels[:-1])


def reference_ece(logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int = 15) -> float:
    """ECE with explicit bin edges, one bin at a time."""
    scaled = logits / temperature
    probabilities = np.exp(scaled - scaled.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    total = 0.0
    for low, high in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_ece_matches_a_bin_by_bin_reference_and_a_hand_computed_case():
    logits = torch.randn(3000, 4, generator=torch.Generator().manual_seed(3)) * 3
    labels = sampled_labels(logits, 0.5, seed=4)
    for temperature in (1.0, 0.5, 2.0):
        assert expected_calibration_error(logits, labels, temperature) == pytest.approx(
            reference_ece(logits.double().numpy(), labels.numpy(), temperature), abs=1e-9)
    # two queries at confidence 0.75 (same bin), one right: |0.5 - 0.75| = 0.25; batched (E, Q, C) logits too
    two = torch.log(torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    assert expected_calibration_error(two, torch.tensor([0, 1])) == pytest.approx(0.25)
    assert expected_calibration_error(two.unsqueeze(0), torch.tensor([0, 1])) == pytest.approx(0.25)
    meter = CalibrationMeter({"a": 2.0})
    meter("a", logits[:1000].view(10, 100, 4), labels[:1000].view(10, 100))
    meter("a", logits[1000:].view(20, 100, 4), labels[1000:].view(20, 100))
    assert meter.summary()["a"] == pytest.approx({"uncalibrated": expected_calibration_error(logits, labels),
                                                  "calibrated": expected_calibration_error(logits, labels, 2.0)})


def test_rejection_curve_counts_kept_queries_and_their_accuracy():
    # confidences 0.9 (right), 0.6 (wrong), 0.4 (right): threshold 0.5 keeps 2 of 3, one of them right
    probabilities = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    curve = rejection_curve(probabilities.log(), torch.tensor([0, 0, 1]), 1.0, thresholds=(0.0, 0.5, 0.7, 0.95))
    assert [point["kept"] for point in curve] == pytest.approx([1.0, 1.0, 1 / 3, 0.0])
    assert [point["kept_accuracy"] for point in curve[:3]] == pytest.approx([200 / 3, 200 / 3, 100.0])
    assert curve[3]["kept_accuracy"] is None


def test_checkpoint_round_trip_and_a_broken_record(tmp_path):
    state = {"model": {"w": torch.zeros(1)}, "epoch": 1}
    assert read_calibration(state) is None
    record = {"temperatures": {COMBINED: 12.5, "global": 3.0}, "fitted_on": {"split": "val", "way": 5}}
    path = tmp_path / "calibrated.pth"
    torch.save(with_calibration(state, record), path)
    assert read_calibration(read_checkpoint(path)) == record and "calibration" not in state
    for broken in ({"temperatures": [2.0]}, "2.0"):   # a temperature out of range: test_reliability_silent.py
        with pytest.raises(CheckpointError, match="eval_bml.py --calibrate"):
            read_calibration({**state, "calibration": broken})


def test_training_calibrates_its_checkpoints_and_the_test_ece_drops(run_folder):
    last, best = read_checkpoint(run_folder / "last.pth"), read_checkpoint(run_folder / "best.pth")
    record = read_calibration(last)
    assert record == read_calibration(best) and set(record["temperatures"]) == VOTES
    config = last["config"]
    setting = {"way": config.n_ways, "shot": config.n_shots, "query": config.n_queries}
    assert record["fitted_on"] == {"split": "val", **setting, "episodes": 60, "seed": 0}
    assert all(nll["calibrated"] <= nll["uncalibrated"] for nll in record["val_nll"].values())
    model = model_from_state(last)
    test_set = build_evaluation_dataset("glyphs", "test", image_size=32, transform="O")
    meter = CalibrationMeter(record["temperatures"])
    evaluate_episodes(model, test_set, *setting.values(), episodes=150, seeds=[0],
                      options=EmbeddingOptions(progress=False), logits_sink=meter)
    errors = meter.summary()
    assert set(errors) == VOTES
    assert errors[COMBINED]["calibrated"] < errors[COMBINED]["uncalibrated"]
    assert np.mean([e["calibrated"] for e in errors.values()]) < np.mean([e["uncalibrated"] for e in errors.values()])


def run_eval(capsys, *argv: str) -> tuple[int, str]:
    args = eval_bml.get_args_parser().parse_args(
        [*argv, "--episodes", "20", "--seeds", "0", "--calibration_episodes", "40", "--num_workers", "0",
         "--device", "cpu", "--no_progress"])
    code = eval_bml.main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_eval_calibrates_a_released_checkpoint_into_a_copy_the_predictor_uses(run_folder, tmp_path, capsys):
    trained = read_checkpoint(run_folder / "last.pth")
    released = save_released_checkpoint(tmp_path / "released.pth", model_state_dict(trained),
                                        **model_config(trained))
    released_bytes = released.read_bytes()
    copy, json_path = tmp_path / "calibrated.pth", tmp_path / "results.json"
    code, output = run_eval(capsys, "--ckp_path", str(released), "--calibrate", "--save_calibration", str(copy),
                            "--output_dir", str(tmp_path), "--json", str(json_path))
    assert code == 0, output
    assert released.read_bytes() == released_bytes and "ECE (15 bins)" in output
    calibration = json.loads(json_path.read_text())["calibration"]
    assert calibration["source"] == "--calibrate" and calibration["ece_bins"] == 15
    assert set(calibration["temperatures"]) == set(calibration["ece"]) == set(calibration["val_rejection"]) == VOTES
    assert all(set(errors) == {"uncalibrated", "calibrated"} for errors in calibration["ece"].values())
    curve = calibration["val_rejection"][COMBINED]
    assert curve[0]["threshold"] == 0.0 and curve[0]["kept"] == 1.0
    assert [point["kept"] for point in curve] == sorted((point["kept"] for point in curve), reverse=True)
    temperatures = read_calibration(read_checkpoint(copy))["temperatures"]
    assert temperatures == pytest.approx(calibration["temperatures"])

    classifier = FewShotClassifier.from_checkpoint(copy, device="cpu", progress=False)
    assert classifier.temperature == pytest.approx(temperatures[COMBINED])
    assert FewShotClassifier.from_checkpoint(released, device="cpu", progress=False).temperature is None
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    classifier.fit(images[:4], ["a", "a", "b", "b"])
    logits = torch.from_numpy(classifier.decision_function(images[4:])).double()
    np.testing.assert_allclose(classifier.predict_proba(images[4:]),
                               (logits / temperatures[COMBINED]).softmax(1).numpy(), rtol=1e-6)

    copy_json = tmp_path / "results_of_the_copy.json"   # another checkpoint: results.json is not replaced
    code, output = run_eval(capsys, "--ckp_path", str(copy), "--output_dir", str(tmp_path), "--json", str(copy_json))
    assert code == 0, output
    stored = json.loads(copy_json.read_text())["calibration"]
    assert stored["source"] == "checkpoint" and "calibrated" in stored["ece"][COMBINED]


@pytest.mark.parametrize("argv, message", [
    (["--save_calibration", "SAME"], "add --calibrate"),
    (["--calibrate", "--save_calibration", "SAME"], "is the checkpoint evaluated: it is never modified"),
])
def test_eval_refuses_to_overwrite_the_checkpoint_or_save_without_fitting(run_folder, capsys, argv, message):
    checkpoint = str(run_folder / "best.pth")
    code, output = run_eval(capsys, "--ckp_path", checkpoint, *(checkpoint if a == "SAME" else a for a in argv))
    assert code == 1 and message in output
