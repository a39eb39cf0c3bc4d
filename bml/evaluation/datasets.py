"""The split an evaluation runs on, with its test transform (cross-domain: another data set's images)."""
from __future__ import annotations

from pathlib import Path

from bml.datasets import NORMALIZATION, FewShotDataset, build_dataset, input_transform_settings, with_normalization


def build_evaluation_dataset(name: str, split: str = "test", data_root: str | Path | None = None,
                             image_size: int | None = None, transform: str | None = None,
                             test_dataset: str | None = None, allow_uncropped_cub: bool = False) -> FewShotDataset:
    """The split to evaluate on, with its test transform (`transform` overrides the data set's id).

    Cross-domain (`test_dataset`, e.g. a miniImageNet model on CUB): the images of `test_dataset` get
    its own resize/crop, which suits how they are stored, but the normalisation of the model's
    transform (`transform`, else `name`'s default): the input statistics its BatchNorm layers were
    fitted to. `image_size` defaults to the input size of `name`. CUB needs its bounding-box crops unless
    `allow_uncropped_cub`.
    """
    transform, image_size = input_transform_settings({"dataset": name}, image_size, transform)
    if test_dataset is None:
        return build_dataset(name, split, data_root, image_size, train=False, transform=transform,
                             allow_uncropped_cub=allow_uncropped_cub)
    dataset = build_dataset(test_dataset, split, data_root, image_size, train=False,
                            allow_uncropped_cub=allow_uncropped_cub)
    return with_normalization(dataset, *NORMALIZATION[transform])
