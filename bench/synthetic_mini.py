"""A learnable synthetic data set in the miniImageNet layout (64/16/20 classes), for checking the real trainer
end to end where the real data cannot be had (a lent GPU machine has no internet).

Each class is a pair of colours and a stripe pattern (orientation and frequency); each image of it has its own
phase, a small tilt, a blob of the second colour and pixel noise. Colour jitter keeps hues and the random crops
keep orientations, so transform A's training augmentation leaves every class recognisable, and classes the
model never saw (val, test) differ in the same ways: a few-shot learner beats chance quickly. Written as the
authors' pickles (a dict of `data`, N x S x S x 3 uint8, and `labels`) under `<root>/miniImageNet/`.

    python bench/synthetic_mini.py ROOT [--image-size 84] [--per-class 60] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bml.datasets.readers import MINI_IMAGENET_FILES  # noqa: E402

CLASSES = {"train": 64, "val": 16, "test": 20}


def class_images(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """`count` images of one new class, (count, size, size, 3) uint8."""
    colours = rng.uniform(0.05, 0.95, (2, 3))
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(1.5, 5.0)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    tilt = angle + rng.normal(0, 0.1, (count, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (x * np.cos(tilt) + y * np.sin(tilt)) + phase)
    centre = rng.uniform(0.2, 0.8, (count, 2, 1, 1))
    blob = ((x - centre[:, 0]) ** 2 + (y - centre[:, 1]) ** 2 < 0.03).astype(float)
    mix = (stripes * (1 - blob))[..., None]                                               # the blob: colour 2
    pixels = mix * colours[0] + (1 - mix) * colours[1] + rng.normal(0, 0.04, (count, size, size, 3))
    return np.clip(255 * pixels, 0, 255).round().astype(np.uint8)


def write_synthetic_mini(root: str | Path, image_size: int = 84, per_class: int = 60, seed: int = 0) -> dict:
    """Write the three pickles under `root/miniImageNet/`; returns the classes and images per split."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "miniImageNet"
    folder.mkdir(parents=True, exist_ok=True)
    written, first_id = {}, 0
    for split, classes in CLASSES.items():
        images = np.concatenate([class_images(rng, per_class, image_size) for _ in range(classes)])
        labels = np.repeat(np.arange(first_id, first_id + classes), per_class)
        order = rng.permutation(len(labels))
        with open(folder / MINI_IMAGENET_FILES[split], "wb") as handle:
            pickle.dump({"data": images[order], "labels": labels[order].tolist()}, handle, protocol=4)
        written[split] = {"classes": classes, "images": len(labels)}
        first_id += classes
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the data root to write miniImageNet/ under")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--per-class", type=int, default=60, help="images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(write_synthetic_mini(args.root, args.image_size, args.per_class, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
