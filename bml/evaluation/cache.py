"""The embedding cache: every image of a split embedded once, one (N, D) tensor per view.

Memory: the cache holds, per image, every view's embedding in float16 (scores are computed in
float32). A full-width BML ResNet-12 at 84 px has two views of 640 x 5 x 5 = 16,000 values, 64 kB an
image: miniImageNet's test split (12,000 images) needs 0.8 GB, tieredImageNet's (206,209 images)
13.2 GB. A cache larger than `max_memory_gb` (default: half of the available RAM) lives in a
memory-mapped file in `cache_dir` (default: the system temp folder), deleted when released; the
scoring then reads it through the page cache, fast while the file fits in RAM, disk-bound otherwise.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bml.datasets.device_augment import EvalCrops, to_model_input
from bml.evaluation.errors import EvaluationError
from bml.utils.device import AMP_DTYPES
from bml.utils.io import DISK_FULL_ERRNOS, OutputError, check_output_folder
from bml.utils.messages import info
from bml.utils.progress import progress
from bml.utils.workers import leave_stopping_to_the_main_process

FLOAT16_MAX, FLOAT16_SMALLEST_NORMAL = 65504.0, 2.0 ** -14
STORAGE_FALLBACK_NOTE = (f"the embeddings fall outside the float16 range (above {FLOAT16_MAX:g}, or an image's all "
                         f"below {FLOAT16_SMALLEST_NORMAL:.2g}, where float16 keeps too few bits or flushes them to 0)")


def float16_problem(embeddings: Sequence[torch.Tensor]) -> str | None:
    """Why float16 cannot hold these (B, D) embeddings (None when it can): a value above its range (inf), or an
    image whose every value is below its smallest normal number (stored with few bits of precision, or as 0:
    features of ~1e-9 would all be 0 and every episode a guess). Exact zero rows are held exactly."""
    for embedding in embeddings:
        largest = embedding.detach().abs().amax(dim=1)
        if (largest > FLOAT16_MAX).any():
            return f"the embeddings exceed the float16 range ({FLOAT16_MAX:g})"
        if ((largest > 0) & (largest < FLOAT16_SMALLEST_NORMAL)).any():
            return (f"the embeddings of some images are all below float16's smallest normal number "
                    f"({FLOAT16_SMALLEST_NORMAL:.2g}), where it keeps too few bits or flushes them to 0")
    return None


@dataclass(frozen=True)
class EmbeddingOptions:
    """How images are embedded into the cache: one value for every pass of an evaluation (the split's and the
    base classes'), so that they are embedded alike."""

    batch_size: int = 128
    device: str | torch.device = "cpu"
    amp: str = "off"                              # a key of `bml.utils.device.AMP_DTYPES`
    num_workers: int = 0
    storage_dtype: torch.dtype = torch.float16    # float32 where float16 cannot hold an embedding
    max_memory_gb: float | None = None            # larger caches are memory-mapped; None: half of the free RAM
    cache_dir: str | None = None                  # the memory-mapped file's folder; None: the temp folder
    progress: bool = True


def available_memory_bytes() -> int:
    """RAM that can be allocated without swapping (MemAvailable on Linux, free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def allocate_cache(num_images: int, dims: Sequence[int], dtype: torch.dtype,
                   max_memory_gb: float | None = None, cache_dir: str | None = None) -> tuple[torch.Tensor, ...]:
    """One (num_images, D) tensor per view, in RAM if it fits the budget, else memory-mapped.

    A memory-mapped cache is an unlinked temporary file: its disk space is freed when the tensors
    are, even if the process dies. Its space is reserved when it is created (`posix_fallocate`), so that a disk
    that fills up says "no space left on device" then, instead of killing the process with SIGBUS mid-embedding.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = num_images * sum(dims) * itemsize
    budget = available_memory_bytes() / 2 if max_memory_gb is None else max_memory_gb * 2**30
    if needed <= budget:
        return tuple(torch.empty((num_images, dim), dtype=dtype) for dim in dims)
    cache_dir = cache_dir or tempfile.gettempdir()
    check_output_folder(cache_dir, "--cache_dir")
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise MemoryError(
            f"the embedding cache needs {needed / 2**30:.1f} GB: more than the memory budget "
            f"({budget / 2**30:.1f} GB) and than the free space in {cache_dir} ({free / 2**30:.1f} GB); "
            f"pass --cache_dir on a larger disk or raise --max_memory_gb")
    info(f"Embedding cache of {needed / 2**30:.1f} GB exceeds the memory budget of {budget / 2**30:.1f} GB: "
         f"memory-mapping it in {cache_dir}")
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    cache = []
    for dim in dims:
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix="bml_embeddings_", suffix=".bin") as file:
            reserve_space(file.fileno(), num_images * dim * itemsize, cache_dir)
            array = np.memmap(file, dtype=numpy_dtype, mode="w+", shape=(num_images, dim))
        cache.append(torch.from_numpy(array))
    return tuple(cache)


def reserve_space(descriptor: int, size: int, cache_dir: str) -> None:
    """Allocate `size` bytes of the open file on its disk now; OutputError when the disk cannot hold them."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(descriptor, 0, size)
        else:   # no fallocate (macOS): at least the file's size, so that the memory map covers it
            os.ftruncate(descriptor, size)
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS + (errno.EFBIG,):
            raise
        raise OutputError(error.errno, f"no space left on device for the memory-mapped embedding cache in {cache_dir} "
                                       f"({size / 2**30:.2f} GB, {shutil.disk_usage(cache_dir).free / 2**30:.2f} GB "
                                       "free): free some space, pass --cache_dir on a larger disk, or raise "
                                       "--max_memory_gb") from None


@torch.inference_mode()
def embed_dataset(model: torch.nn.Module, dataset: torch.utils.data.Dataset,
                  options: EmbeddingOptions = EmbeddingOptions()) -> tuple[torch.Tensor, ...]:
    """Embed every image of `dataset` once: one (N, D) CPU tensor per view, in dataset order.

    The model runs in eval mode (its previous mode is restored). float16 storage halves the cache;
    near-ties between two prototypes may then rarely resolve differently than in float32. Values
    float16 cannot hold (above 65504: inf; an image's all below 6.1e-05: few bits or 0) are never stored so: the
    cache then switches to float32
    (the dtype of the returned tensors says which was used). A data set built with its test transform is
    loaded as uint8 crops and converted and normalised on the device (`EvalCrops`: the same inputs).
    """
    device, storage_dtype = torch.device(options.device), options.storage_dtype
    crops = EvalCrops(dataset) if EvalCrops.applies_to(dataset) else None   # uint8 to the device, normalised there
    loader = torch.utils.data.DataLoader(crops if crops is not None else dataset, batch_size=options.batch_size,
                                         shuffle=False, num_workers=options.num_workers,
                                         pin_memory=device.type == "cuda",
                                         worker_init_fn=leave_stopping_to_the_main_process)
    was_training = model.training
    model.eval()
    cache: tuple[torch.Tensor, ...] = ()
    start = 0
    try:
        for images, _ in progress(loader, "embedding", unit="batch", enabled=options.progress):
            images = images.to(device, non_blocking=True)
            if crops is not None:
                images = to_model_input(images, crops.mean, crops.std)
            with torch.autocast(device.type, dtype=AMP_DTYPES[options.amp], enabled=options.amp != "off"):
                embeddings = model.embed(images)
            if not cache:
                cache = allocate_cache(len(dataset), [e.shape[1] for e in embeddings], storage_dtype,
                                       options.max_memory_gb, options.cache_dir)
            end = start + len(images)
            if not all(torch.isfinite(embedding).all() for embedding in embeddings):
                raise EvaluationError(
                    f"the model produced non-finite embeddings for images {start}..{end - 1}: the "
                    f"checkpoint diverged, or --amp fp16 overflowed (try --amp off or bf16)")
            problem = float16_problem(embeddings) if storage_dtype == torch.float16 else None
            if problem:
                cache = widen_cache(cache, start, options.max_memory_gb, options.cache_dir, problem)
                storage_dtype = torch.float32
            stored = [embedding.to("cpu", storage_dtype) for embedding in embeddings]
            for target, part in zip(cache, stored):
                target[start:end] = part
            start = end
    finally:
        model.train(was_training)
    return cache


def widen_cache(cache: Sequence[torch.Tensor], filled: int, max_memory_gb: float | None,
                cache_dir: str | None, reason: str) -> tuple[torch.Tensor, ...]:
    """A float32 copy of a cache whose first `filled` rows are done: for embeddings float16 cannot hold."""
    info(f"{reason}: storing the embeddings in float32")
    wider = allocate_cache(len(cache[0]), [part.shape[1] for part in cache], torch.float32, max_memory_gb, cache_dir)
    for target, part in zip(wider, cache):
        target[:filled] = part[:filled]
    return wider
