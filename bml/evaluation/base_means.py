"""The base classes' mean embedding of every view: the centre of a head that centres on it (`cl2n`),
embedded once per model and base split and kept in a small file that later evaluations reuse.

The file lives in the project's cache folder (`base_means_dir`), named by a digest of the model's weights and the
base images; it holds that digest and one of the means themselves, both checked when it is read, so that a file
of another model or with edited values is embedded again (with a warning), never used."""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bml.datasets.image_files import cache_dir
from bml.evaluation.cache import EmbeddingOptions, embed_dataset
from bml.evaluation.cached_scoring import mean_row
from bml.utils.io import atomic_write
from bml.utils.messages import warn

BASE_MEANS_STORAGE = torch.float16
"""The cache dtype the base classes are embedded in, whatever an evaluation's storage: a means file
(`base_means_path`) does not record one, so every evaluation that reads it must have embedded alike."""


def base_means_dir() -> Path:
    """Where the means files are kept: `base_means` in $BML_CACHE_DIR (default ~/.cache/bml)."""
    return cache_dir() / "base_means"


def means_key(model: torch.nn.Module, base_dataset: torch.utils.data.Dataset, amp: str) -> str:
    """sha256 of a model's weights, the base images (their set, labels, transform and the pixels of the first and
    last) and `amp`: what the means are computed from."""
    digest = hashlib.sha256(f"{base_dataset!r} {len(base_dataset)} {getattr(base_dataset, 'transform', '')!r} "
                            f"{amp}".encode())
    digest.update(np.ascontiguousarray(getattr(base_dataset, "labels", np.empty(0))).tobytes())
    for index in sorted({0, len(base_dataset) - 1}):   # the pixels of two images: same counts, other files
        digest.update(torch.as_tensor(base_dataset[index][0]).numpy().tobytes())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_means_path(model: torch.nn.Module, base_dataset: torch.utils.data.Dataset, amp: str,
                    means_dir: str | Path) -> Path:
    """The file of a model's base-class means in `means_dir`, named by `means_key`: another checkpoint or data set
    gets its own."""
    return means_file(means_dir, means_key(model, base_dataset, amp))


def means_file(means_dir: str | Path, key: str) -> Path:
    return Path(means_dir) / f"bml_base_means_{key[:20]}.pt"


def means_digest(means: tuple[torch.Tensor, ...]) -> str:
    digest = hashlib.sha256()
    for mean in means:
        digest.update(f"{mean.dtype} {tuple(mean.shape)}".encode())
        digest.update(mean.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_means(path: Path, key: str) -> tuple[torch.Tensor, ...] | None:
    """The means of `path` when it holds those of `key` unchanged, else None (with a warning: they are embedded
    again and the file replaced)."""
    try:
        saved = torch.load(path, weights_only=True)
        means = tuple(saved["means"]) if isinstance(saved, dict) else None
        valid = (means is not None and saved.get("key") == key and all(torch.is_tensor(mean) for mean in means)
                 and saved.get("digest") == means_digest(means))
    except Exception:   # noqa: BLE001 (any damage to the file only means embedding again)
        valid = False
    if valid:
        return means
    warn(f"the base-class means file {path} is not one this model and data set wrote, or was edited: embedding the "
         "base classes again")
    return None


def base_class_means(model: torch.nn.Module, base_dataset: torch.utils.data.Dataset,
                     options: EmbeddingOptions = EmbeddingOptions(),
                     means_dir: str | Path | None = None) -> tuple[torch.Tensor, ...]:
    """Every view's mean embedding (float32, CPU) of the base classes' training images under the test
    transform: the side input `bml.scoring.BASE_MEAN` of a head that centres on it (`cl2n`).

    Embedded once by `embed_dataset` with `options` (in `BASE_MEANS_STORAGE`, memory-mapped as an evaluation's);
    with `means_dir` (`base_means_dir()` for the project's cache) the means are also kept there in a small file
    (`base_means_path`) that later evaluations of the same model reuse instead of embedding the base classes again.
    """
    key = means_key(model, base_dataset, options.amp) if means_dir is not None else None
    path = means_file(means_dir, key) if key is not None else None
    if path is not None and path.is_file():
        means = read_means(path, key)
        if means is not None:
            return means
    cache = embed_dataset(model, base_dataset, replace(options, storage_dtype=BASE_MEANS_STORAGE))
    means = tuple(mean_row(view, torch.device(options.device), 4096).cpu() for view in cache)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            torch.save({"key": key, "means": list(means), "digest": means_digest(means)}, handle)
    return means
