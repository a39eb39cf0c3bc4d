"""The base classes' mean embedding of every view: the centre of a head that centres on it (`cl2n`),
embedded once per model and base split and kept in a small file that later evaluations reuse."""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bml.evaluation.cache import EmbeddingOptions, embed_dataset
from bml.evaluation.cached_scoring import mean_row
from bml.utils.io import atomic_write

BASE_MEANS_STORAGE = torch.float16
"""The cache dtype the base classes are embedded in, whatever an evaluation's storage: a means file
(`base_means_path`) does not record one, so every evaluation that reads it must have embedded alike."""


def base_means_path(model: torch.nn.Module, base_dataset: torch.utils.data.Dataset, amp: str,
                    cache_dir: str | Path) -> Path:
    """The file of a model's base-class means in `cache_dir`, named by a digest of its weights, the base
    images (their set, labels and transform) and `amp`: another checkpoint or data set gets its own."""
    digest = hashlib.sha256(f"{base_dataset!r} {len(base_dataset)} {getattr(base_dataset, 'transform', '')!r} "
                            f"{amp}".encode())
    digest.update(np.ascontiguousarray(getattr(base_dataset, "labels", np.empty(0))).tobytes())
    for index in sorted({0, len(base_dataset) - 1}):   # the pixels of two images: same counts, other files
        digest.update(torch.as_tensor(base_dataset[index][0]).numpy().tobytes())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return Path(cache_dir) / f"bml_base_means_{digest.hexdigest()[:20]}.pt"


def base_class_means(model: torch.nn.Module, base_dataset: torch.utils.data.Dataset,
                     options: EmbeddingOptions = EmbeddingOptions(),
                     means_dir: str | Path | None = None) -> tuple[torch.Tensor, ...]:
    """Every view's mean embedding (float32, CPU) of the base classes' training images under the test
    transform: the side input `bml.scoring.BASE_MEAN` of a head that centres on it (`cl2n`).

    Embedded once by `embed_dataset` with `options` (in `BASE_MEANS_STORAGE`, memory-mapped as an evaluation's);
    with `means_dir` the means are also kept there in a small file (`base_means_path`) that later
    evaluations of the same model reuse instead of embedding the base classes again.
    """
    path = base_means_path(model, base_dataset, options.amp, means_dir) if means_dir is not None else None
    if path is not None and path.is_file():
        return tuple(torch.load(path, weights_only=True))
    cache = embed_dataset(model, base_dataset, replace(options, storage_dtype=BASE_MEANS_STORAGE))
    means = tuple(mean_row(view, torch.device(options.device), 4096).cpu() for view in cache)
    if path is not None:
        with atomic_write(path, "wb") as handle:
            torch.save(list(means), handle)
    return means
