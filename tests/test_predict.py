"""`FewShotClassifier` and `python -m bml.predict` on fixture images with a tiny random BML.

Solid-colour classes give a known accuracy with any network (a query of a class's colour has exactly
its prototype's embedding, whatever its size or PIL mode); noise images are checked against an
independent nearest-prototype computation.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bml import FewShotClassifier
from bml.classifier import FewShotInputError
from bml.datasets import build_transform, input_transform_settings
from bml.models import BML
from bml.predict import get_args_parser, main
from fixtures import save_released_checkpoint

IMAGE_SIZE = 32
COLOURS = {"blue": (20, 40, 230), "grey": (128, 128, 128), "red": (230, 30, 20)}
SUPPORT_SHOTS = {"blue": 1, "grey": 2, "red": 3}
MODES = ("RGB", "L", "P", "RGBA")


def tiny_config(**overrides) -> argparse.Namespace:
    settings = dict(model="bml", backbone="resnet12", width=0.125, num_classes=4, drop_rate=0.1,
                    dataset="glyphs", image_size=IMAGE_SIZE, transform="O")
    return argparse.Namespace(**{**settings, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_bml.pth"
    return save_released_checkpoint(path, BML(num_classes=4, width=0.125), **vars(tiny_config()))


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int], mode: str = "RGB") -> Path:
    """A one-colour image; modes L/P/RGBA keep the colour exact when it is grey / in the palette / opaque."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image = image.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
    image.save(path)
    return path


def make_support(root: Path) -> Path:
    for name, shots in SUPPORT_SHOTS.items():
        for shot in range(shots):
            solid(root / name / f"s{shot}.png", COLOURS[name], (24 + 9 * shot, 40 - 5 * shot))
    return root


def make_queries_by_class(root: Path) -> Path:
    """Two queries per class in mixed sizes and modes, one red image filed as blue (the one wrong
    prediction: 6/7), a corrupt PNG and a text file (both skipped)."""
    for c, name in enumerate(COLOURS):
        for q in range(2):
            mode = "L" if name == "grey" else MODES[(c + q) % len(MODES)]
            mode = "RGB" if mode == "L" and name != "grey" else mode
            solid(root / name / f"q{q}.png", COLOURS[name], (17 + 30 * q, 33 + 7 * c), mode)
    solid(root / "blue" / "actually_red.jpg", COLOURS["red"], (50, 50))
    (root / "grey" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (root / "notes.txt").write_text("not an image\n")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(get_args_parser().parse_args([*argv, "--device", "cpu", "--num_workers", "0", "--no_progress"]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_reports_accuracy_writes_csv_and_sheet(tmp_path, checkpoint, capsys):
    support, queries = make_support(tmp_path / "support"), make_queries_by_class(tmp_path / "queries")
    out, sheet = tmp_path / "predictions.csv", tmp_path / "sheet.png"
    code, stdout, stderr = run_cli(capsys, "--ckp_path", str(checkpoint), "--support", str(support),
                                   "--query", str(queries), "--out", str(out), "--sheet", str(sheet))
    assert code == 0, stderr
    assert "accuracy: 6/7 = 85.71%" in stdout
    assert "2 of 9 query files are not readable images, skipped" in stderr
    assert "corrupt.png" in stderr and "notes.txt" in stderr
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "prediction", "confidence", "runner_up"]
    by_name = {Path(row["path"]).relative_to(queries).as_posix(): row for row in rows}
    assert sorted(by_name) == sorted(["blue/actually_red.jpg"] + [f"{n}/q{q}.png" for n in COLOURS for q in (0, 1)])
    assert by_name["blue/actually_red.jpg"]["prediction"] == "red"
    for name, row in by_name.items():
        assert row["prediction"] in name or name == "blue/actually_red.jpg"
        assert row["runner_up"] in COLOURS and row["runner_up"] != row["prediction"]
        assert 1 / 3 < float(row["confidence"]) <= 1.0
    with Image.open(sheet) as image:
        assert image.width > 500 and image.height > 300
    assert "capped" not in stdout


def test_cli_caps_the_sheet_and_accepts_a_single_image(tmp_path, checkpoint, capsys):
    support, queries = make_support(tmp_path / "support"), make_queries_by_class(tmp_path / "queries")
    code, stdout, _ = run_cli(capsys, "--ckp_path", str(checkpoint), "--support", str(support), "--query",
                              str(queries), "--out", str(tmp_path / "p.csv"), "--sheet", str(tmp_path / "s.png"),
                              "--sheet_max", "3")
    assert code == 0 and "capped at --sheet_max 3: 3 of 7 queries shown" in stdout
    code, stdout, _ = run_cli(capsys, "--ckp_path", str(checkpoint), "--support", str(support), "--query",
                              str(queries / "red" / "q0.png"), "--out", str(tmp_path / "one.csv"))
    assert code == 0 and "accuracy" not in stdout
    assert (tmp_path / "one.csv").read_text().splitlines()[1].split(",")[1] == "red"


@pytest.mark.parametrize("problem, message", [
    ("empty class", "empty class folder(s)"),
    ("one class", "needs at least two classes"),
    ("missing checkpoint", "checkpoint not found"),
    ("mismatched checkpoint", "checkpoint does not match BML"),
    ("no readable support", "no readable support image for class(es) ['grey']"),
])
def test_cli_errors_are_one_clear_line_and_exit_1(tmp_path, checkpoint, capsys, problem, message):
    support = make_support(tmp_path / "support")
    ckp_path = checkpoint
    if problem == "empty class":
        (support / "green").mkdir()
    elif problem == "one class":
        for name in ("blue", "grey"):
            for file in (support / name).iterdir():
                file.unlink()
            (support / name).rmdir()
    elif problem == "missing checkpoint":
        ckp_path = tmp_path / "nowhere.pth"
    elif problem == "mismatched checkpoint":
        ckp_path = tmp_path / "wider.pth"
        save_released_checkpoint(ckp_path, torch.load(checkpoint, weights_only=False)["model"],
                                 **vars(tiny_config(width=0.25)))
    else:
        for file in (support / "grey").iterdir():
            file.write_bytes(b"garbage")
    queries = solid(tmp_path / "query.png", COLOURS["red"], (30, 30))
    code, _, stderr = run_cli(capsys, "--ckp_path", str(ckp_path), "--support", str(support), "--query",
                              str(queries), "--out", str(tmp_path / "p.csv"))
    assert code == 1
    assert message in stderr and "Traceback" not in stderr


def test_module_entry_point_exits_1_without_traceback(tmp_path):
    make_support(tmp_path / "support")
    result = subprocess.run([sys.executable, "-m", "bml.predict", "--ckp_path", str(tmp_path / "missing.pth"),
                             "--support", str(tmp_path / "support"), "--query", str(tmp_path / "support"),
                             "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("ERROR: checkpoint not found") and "Traceback" not in result.stderr


def noise_images(rng: np.random.Generator, count: int) -> list[Image.Image]:
    """Random images in mixed sizes and modes."""
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, (20 + 3 * i, 30 + i % 4, 3), dtype=np.uint8)
        mode = MODES[i % len(MODES)]
        image = Image.fromarray(pixels)
        images.append(image.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode))
    return images


def reference_logits(model: torch.nn.Module, support: list[Image.Image], labels: list[int],
                     queries: list[Image.Image]) -> torch.Tensor:
    """Summed per-view minus squared distances to the class means, by hand (torch.cdist)."""
    transform = build_transform("O", IMAGE_SIZE)
    with torch.no_grad():
        support_views = model.embed(torch.stack([transform(image.convert("RGB")) for image in support]))
        query_views = model.embed(torch.stack([transform(image.convert("RGB")) for image in queries]))
    labels = torch.tensor(labels)
    logits = 0
    for support_view, query_view in zip(support_views, query_views):
        prototypes = torch.stack([support_view[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
        logits = logits - torch.cdist(query_view.double(), prototypes.double()).square()
    return logits


def test_api_matches_an_independent_nearest_prototype_reference(checkpoint):
    rng = np.random.default_rng(0)
    support, queries = noise_images(rng, 7), noise_images(rng, 6)
    labels = ["zebra", "ant", "moth", "ant", "zebra", "ant", "moth"]   # sorted classes: ant, moth, zebra
    clf = FewShotClassifier.from_checkpoint(checkpoint, device="cpu", batch_size=4).fit(support, labels)
    assert clf.classes_ == ["ant", "moth", "zebra"] and clf.shots_ == [3, 2, 2]

    expected = reference_logits(clf.model, support, [clf.classes_.index(label) for label in labels], queries)
    probabilities = clf.predict_proba(queries)
    assert probabilities.shape == (6, 3) and np.allclose(probabilities.sum(1), 1.0)
    np.testing.assert_allclose(clf.decision_function(queries), expected.numpy(), rtol=1e-4, atol=1e-3)
    assert clf.predict(queries) == [clf.classes_[c] for c in expected.argmax(1).tolist()]

    transformed = torch.stack([clf.transform(image.convert("RGB")) for image in queries])
    np.testing.assert_allclose(clf.predict_proba(transformed), probabilities, atol=1e-6)
    assert clf.predict(queries[0]) == clf.predict(transformed[0]) == clf.predict(queries)[:1]


def test_api_reads_paths_and_arrays_and_reports_bad_input(tmp_path, checkpoint):
    support = make_support(tmp_path / "support")
    paths = sorted(support.rglob("*.png"))
    labels = [path.parent.name for path in paths]
    clf = FewShotClassifier.from_checkpoint(str(checkpoint), device="cpu").fit(paths, labels)
    red = np.full((10, 14, 3), COLOURS["red"], dtype=np.uint8)
    assert clf.predict([red, str(paths[0]), Image.new("L", (9, 9), 128)]) == ["red", "blue", "grey"]

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(FewShotInputError, match="1 of 2 query files are not readable images:\n  .*broken.png"):
        clf.predict([paths[0], broken])
    with pytest.warns(UserWarning, match="broken.png"):
        scores = clf.score([broken, paths[0]], skip_unreadable=True)
    assert scores.kept == [1] and scores.ranked(0)[0] == ["blue"]
    with pytest.raises(FewShotInputError, match="at least two classes"):
        clf.fit(paths[:1], ["blue"])
    with pytest.raises(FewShotInputError, match=r"float of shape \(3, 32, 32\)"):
        clf.predict(torch.zeros(2, 3, 28, 28))
    with pytest.raises(FileNotFoundError):
        FewShotClassifier.from_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize("config, overrides, expected", [
    ({"dataset": "miniImageNet"}, {}, ("A", 84)),            # released checkpoints record no image_size
    ({"dataset": "CIFAR-FS", "transform": "D"}, {}, ("D", 84)),
    ({"dataset": "glyphs", "image_size": 32, "transform": "O"}, {}, ("O", 32)),
    ({"dataset": "my_photos"}, {}, ("A", 84)),               # an image-folder data set: natural images
    ({"dataset": "CUB"}, {"image_size": 64, "transform_id": "A"}, ("A", 64)),
])
def test_input_transform_follows_the_checkpoint(config, overrides, expected):
    assert input_transform_settings(config, **overrides) == expected


def test_checkpoint_without_data_set_gets_natural_image_transform_with_a_warning():
    with pytest.warns(UserWarning, match="records neither its data set nor its transform"):
        assert input_transform_settings({}) == ("A", 84)


def test_explicit_input_settings_that_differ_from_the_checkpoints_warn_once(recwarn):
    recorded = {"dataset": "glyphs", "image_size": 32, "transform": "O"}
    assert input_transform_settings(recorded, 32, "O") == ("O", 32) and not recwarn.list
    assert input_transform_settings({"dataset": "glyphs"}, 28, "A") == ("A", 28) and not recwarn.list
    assert input_transform_settings(recorded, 28, "A") == ("A", 28)
    assert [str(warning.message).split(":")[0] for warning in recwarn.list] == [
        "--transform A differs from the checkpoint's O", "--image_size 28 differs from the checkpoint's 32"]


def test_reject_labels_low_confidence_queries_unknown_and_says_whether_calibrated(tmp_path, checkpoint, capsys):
    support, queries = make_support(tmp_path / "support"), make_queries_by_class(tmp_path / "queries")
    out, sheet = tmp_path / "predictions.csv", tmp_path / "sheet.png"
    common = ("--support", str(support), "--query", str(queries), "--out", str(out))
    code, stdout, _ = run_cli(capsys, "--ckp_path", str(checkpoint), *common)
    assert code == 0 and "confidences uncalibrated" in stdout and "eval_bml.py" in stdout
    with open(out, newline="") as file:
        plain = {row["path"]: row for row in csv.DictReader(file)}

    # a temperature at the logits' scale spreads the confidences; the median one is the threshold
    classifier = FewShotClassifier.from_checkpoint(checkpoint, device="cpu", progress=False)
    classifier.fit(sorted(support.rglob("*.png")), [path.parent.name for path in sorted(support.rglob("*.png"))])
    logits = torch.from_numpy(classifier.decision_function(list(plain))).double()
    temperature = float(logits.std())
    confidences = (logits / temperature).softmax(1).max(1).values.numpy()
    threshold = float(np.median(confidences))
    unknown = {path for path, confidence in zip(plain, confidences) if confidence < threshold}
    assert 0 < len(unknown) < len(plain)
    state = torch.load(checkpoint, weights_only=False)
    calibrated = tmp_path / "calibrated.pth"
    torch.save({**state, "calibration": {"temperatures": {"bml": temperature}}}, calibrated)

    code, stdout, stderr = run_cli(capsys, "--ckp_path", str(calibrated), *common, "--reject", str(threshold),
                                   "--sheet", str(sheet))
    assert code == 0, stderr
    assert f"confidences calibrated: vote bml at temperature {temperature:.4g}" in stdout
    with open(out, newline="") as file:
        rejected = {row["path"]: row for row in csv.DictReader(file)}
    assert rejected.keys() == plain.keys()
    for path, row in rejected.items():
        assert row["prediction"] == ("unknown" if path in unknown else plain[path]["prediction"])
    assert f"unknown: {len(unknown)} of {len(plain)} queries" in stdout and "unknown ones left out" in stdout
    assert sheet.is_file()

    torch.save({**state, "calibration": {"temperatures": {"bml": 1e6}}}, calibrated)   # the range's top: all ~1/3
    code, stdout, _ = run_cli(capsys, "--ckp_path", str(calibrated), *common, "--reject", "0.5")
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert code == 0 and all(row["prediction"] == "unknown" for row in rows)
    assert all(float(row["confidence"]) == pytest.approx(1 / 3, abs=1e-3) for row in rows)
    assert f"unknown: {len(rows)} of {len(rows)} queries" in stdout and "accuracy:" not in stdout

    (support / "unknown").mkdir()
    solid(support / "unknown" / "s.png", (0, 200, 0), (20, 20))
    code, _, stderr = run_cli(capsys, "--ckp_path", str(checkpoint), *common, "--reject", "0.5")
    assert code == 1 and "named 'unknown'" in stderr
