"""How far apart images are in each view of a trained model: the scale behind BML's vote.

The published vote sums the views' logits (minus squared distances), so a view whose distances are
larger outvotes the other; `bml_scaled` in the evaluation results corrects for that.

    python experiments/view_scales.py output/omniglot_full/bml/best.pth --data_root ../shared/data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bml.checkpoint import model_config, model_from_state, read_checkpoint
from bml.datasets import input_transform_settings
from bml.evaluation import EmbeddingOptions, build_evaluation_dataset, embed_dataset


def main(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.ckp_path)
    config = model_config(checkpoint)
    model = model_from_state(checkpoint, source=args.ckp_path)
    transform, image_size = input_transform_settings(config)
    dataset = build_evaluation_dataset(config["dataset"], args.split, args.data_root, image_size, transform)
    chosen = np.random.default_rng(args.seed).choice(len(dataset), min(args.images, len(dataset)), replace=False)
    labels = torch.as_tensor(np.asarray(dataset.labels)[chosen])
    same_class = labels[:, None] == labels[None, :]
    different = ~same_class
    same_class.fill_diagonal_(False)
    embeddings = embed_dataset(model, torch.utils.data.Subset(dataset, chosen.tolist()),
                               EmbeddingOptions(progress=False))
    print(f"{args.ckp_path}: {len(chosen)} images of the {args.split} split; mean squared distance between images")
    for name, embedding in zip(model.view_names, embeddings):
        distances = torch.cdist(embedding.float(), embedding.float()).square()
        print(f"{name:>8}: same class {distances[same_class].mean():.1f}, "
              f"different classes {distances[different].mean():.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckp_path", help="a trained checkpoint")
    parser.add_argument("--data_root", default=None, help="data root (default: $BML_DATA_ROOT, else data/)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--images", type=int, default=2000, help="random images of the split")
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
