"""Few-shot evaluation (the published protocol, README "Evaluation"): embed a split once, score many episodes
from the cache.

The published protocol ran the network on the 100 images of every episode, 20,000 episodes for ten
seeds. In eval mode with a deterministic transform an image's embedding does not depend on the
episode, so each image is embedded once (`embed_dataset`) and all episodes are scored from the
cached embeddings, many episodes per batched matrix product (`score_episodes`). The accuracies are
those of the per-episode protocol; `tests/test_evaluation.py` checks this episode by episode.

Memory: the cache holds, per image, every view's embedding in float16 (scores are computed in
float32). A full-width BML ResNet-12 at 84 px has two views of 640 x 5 x 5 = 16,000 values, 64 kB an
image: miniImageNet's test split (12,000 images) needs 0.8 GB, tieredImageNet's (206,209 images)
13.2 GB. A cache larger than `max_memory_gb` (default: half of the available RAM) lives in a
memory-mapped file in `cache_dir` (default: the system temp folder), deleted when released; the
scoring then reads it through the page cache, fast while the file fits in RAM, disk-bound otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from bml.datasets import (NORMALIZATION, EpisodeSampler, FewShotDataset, build_dataset, input_transform_settings,
                          with_normalization)
from bml.datasets.device_augment import EvalCrops, to_model_input
from bml.scoring import (COMBINED, HEADS, PROTO, SCALED, ViewScores, centered_prototype_logits, class_prototypes,
                         episode_labels, nearest_prototype, support_span_coordinates, votes_for)
from bml.utils.io import atomic_write

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Working memory of one scoring chunk; on a CPU a chunk near the L3 cache size is several times faster.
DEFAULT_CHUNK_MB = {"cpu": 48, "cuda": 2048}
# Episodes a head fitted in the support's span (logreg) fits in one optimisation: about 10 kB each (5-way
# 5-shot 15-query, per view), where a gathered chunk holds a few episodes of 16,000-dimensional rows.
SPAN_FIT_EPISODES = 4096
LogitsSink = Callable[[str, torch.Tensor, torch.Tensor], None]
"""Receives (vote name, (episodes, queries, way) logits, (queries,) labels) of every scored chunk."""


STORAGE_FALLBACK_NOTE = "the embeddings exceed the float16 range (65504)"


class EvaluationError(ValueError):
    """A model that cannot be evaluated; the message says why and what to try."""


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
    are, even if the process dies.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = num_images * sum(dims) * itemsize
    budget = available_memory_bytes() / 2 if max_memory_gb is None else max_memory_gb * 2**30
    if needed <= budget:
        return tuple(torch.empty((num_images, dim), dtype=dtype) for dim in dims)
    cache_dir = cache_dir or tempfile.gettempdir()
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise MemoryError(
            f"the embedding cache needs {needed / 2**30:.1f} GB: more than the memory budget "
            f"({budget / 2**30:.1f} GB) and than the free space in {cache_dir} ({free / 2**30:.1f} GB); "
            f"pass --cache_dir on a larger disk or raise --max_memory_gb")
    print(f"Embedding cache of {needed / 2**30:.1f} GB exceeds the memory budget of {budget / 2**30:.1f} GB: "
          f"memory-mapping it in {cache_dir}", flush=True)
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    cache = []
    for dim in dims:
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix="bml_embeddings_", suffix=".bin") as file:
            array = np.memmap(file, dtype=numpy_dtype, mode="w+", shape=(num_images, dim))
        cache.append(torch.from_numpy(array))
    return tuple(cache)


@torch.inference_mode()
def embed_dataset(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 128,
                  device: str | torch.device = "cpu", amp: str = "off", num_workers: int = 0,
                  storage_dtype: torch.dtype = torch.float16, max_memory_gb: float | None = None,
                  cache_dir: str | None = None, progress: bool = True) -> tuple[torch.Tensor, ...]:
    """Embed every image of `dataset` once: one (N, D) CPU tensor per view, in dataset order.

    The model runs in eval mode (its previous mode is restored). float16 storage halves the cache;
    near-ties between two prototypes may then rarely resolve differently than in float32. Values
    float16 cannot hold (above 65504) are never stored as inf: the cache then switches to float32
    (the dtype of the returned tensors says which was used). A data set built with its test transform is
    loaded as uint8 crops and converted and normalised on `device` (`EvalCrops`: the same inputs).
    """
    device = torch.device(device)
    crops = EvalCrops(dataset) if EvalCrops.applies_to(dataset) else None   # uint8 to the device, normalised there
    loader = torch.utils.data.DataLoader(crops if crops is not None else dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    cache: tuple[torch.Tensor, ...] = ()
    start = 0
    try:
        for images, _ in tqdm(loader, desc="embed", unit="batch", disable=not progress):
            images = images.to(device, non_blocking=True)
            if crops is not None:
                images = to_model_input(images, crops.mean, crops.std)
            with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "off"):
                embeddings = model.embed(images)
            if not cache:
                cache = allocate_cache(len(dataset), [e.shape[1] for e in embeddings], storage_dtype,
                                       max_memory_gb, cache_dir)
            end = start + len(images)
            if not all(torch.isfinite(embedding).all() for embedding in embeddings):
                raise EvaluationError(
                    f"the model produced non-finite embeddings for images {start}..{end - 1}: the "
                    f"checkpoint diverged, or --amp fp16 overflowed (try --amp off or bf16)")
            stored = [embedding.to("cpu", storage_dtype) for embedding in embeddings]
            if not all(torch.isfinite(part).all() for part in stored):
                cache = widen_cache(cache, start, max_memory_gb, cache_dir)
                storage_dtype = torch.float32
                stored = [embedding.to("cpu", storage_dtype) for embedding in embeddings]
            for target, part in zip(cache, stored):
                target[start:end] = part
            start = end
    finally:
        model.train(was_training)
    return cache


def widen_cache(cache: Sequence[torch.Tensor], filled: int, max_memory_gb: float | None,
                cache_dir: str | None) -> tuple[torch.Tensor, ...]:
    """A float32 copy of a cache whose first `filled` rows are done: for embeddings float16 cannot hold."""
    print(f"{STORAGE_FALLBACK_NOTE}: storing the embeddings in float32", flush=True)
    wider = allocate_cache(len(cache[0]), [part.shape[1] for part in cache], torch.float32, max_memory_gb, cache_dir)
    for target, part in zip(wider, cache):
        target[:filled] = part[:filled]
    return wider


def _fits_on_device(cache: Sequence[torch.Tensor], device: torch.device) -> bool:
    """True when the whole cache takes at most half of the accelerator's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(t.numel() * t.element_size() for t in cache) <= free / 2


def float_chunks(cache: torch.Tensor, device: torch.device, rows_per_chunk: int,
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """One view's cache in float32 chunks of rows on `device`, each row mapped by `features` when given."""
    for start in range(0, len(cache), rows_per_chunk):
        part = cache[start:start + rows_per_chunk].to(device, torch.float32)
        yield part if features is None else features(part)


def mean_row(cache: torch.Tensor, device: torch.device, rows_per_chunk: int,
             features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The mean row of one view's cache (float32, summed in float64)."""
    total = torch.zeros(cache.shape[1], dtype=torch.float64, device=device)
    for part in float_chunks(cache, device, rows_per_chunk, features):
        total += part.sum(0, dtype=torch.float64)
    return (total / len(cache)).float()


def centered_statistics(cache: torch.Tensor, device: torch.device, rows_per_chunk: int,
                        features: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean row of one view's cache (each row mapped by `features` first) and every row's squared
    distance to it (float32, on `device`)."""
    center = mean_row(cache, device, rows_per_chunk, features)
    squared_norms = torch.cat([(part - center).square().sum(1)
                               for part in float_chunks(cache, device, rows_per_chunk, features)])
    return center, squared_norms


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


def base_class_means(model: torch.nn.Module, base_dataset: torch.utils.data.Dataset, batch_size: int = 128,
                     device: str | torch.device = "cpu", amp: str = "off", num_workers: int = 0,
                     max_memory_gb: float | None = None, cache_dir: str | None = None,
                     means_dir: str | Path | None = None, progress: bool = True) -> tuple[torch.Tensor, ...]:
    """Every view's mean embedding (float32, CPU) of the base classes' training images under the test
    transform: the centre of the `cl2n` head.

    Embedded once by `embed_dataset` (the same cache as the evaluation's, `cache_dir` when memory-mapped);
    with `means_dir` the means are also kept there in a small file (`base_means_path`) that later
    evaluations of the same model reuse instead of embedding the base classes again.
    """
    path = base_means_path(model, base_dataset, amp, means_dir) if means_dir is not None else None
    if path is not None and path.is_file():
        return tuple(torch.load(path, weights_only=True))
    cache = embed_dataset(model, base_dataset, batch_size=batch_size, device=device, amp=amp,
                          num_workers=num_workers, max_memory_gb=max_memory_gb, cache_dir=cache_dir,
                          progress=progress)
    device = torch.device(device)
    means = tuple(mean_row(view, device, 4096).cpu() for view in cache)
    if path is not None:
        with atomic_write(path, "wb") as handle:
            torch.save(list(means), handle)
    return means


def score_episodes(embeddings: Sequence[torch.Tensor], episodes: np.ndarray, way: int, shot: int,
                   device: str | torch.device = "cpu", names: Sequence[str] | None = None,
                   chunk_mb: int | None = None, progress: bool = True, head: str = PROTO,
                   base_means: Sequence[torch.Tensor] | None = None,
                   logits_sink: LogitsSink | None = None) -> dict[str, np.ndarray]:
    """Per-episode query accuracy (%) of every vote of `bml.scoring.votes_for(names)`: each view alone, the
    sum of the views' logits (`'bml'`) and, with several views, `'bml_scaled'` (our extension).

    `episodes` is an (E, way*(shot+query)) index array into the cache, shot-major (see `bml.scoring`).
    Episodes are scored in chunks using about `chunk_mb` MB of working memory. `head` names how each
    view's logits are made (`bml.scoring.HEADS`); `base_means`, one per view, is what a head that
    centres on the base classes' mean needs (`base_class_means`). `logits_sink`, when given, also
    receives every vote's logits (calibration, `bml.calibration`).
    """
    device = torch.device(device)
    names = tuple(names) if names is not None else tuple(f"view{i}" for i in range(len(embeddings)))
    if len(names) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embedding views but {len(names)} names {names}")
    rule = HEADS[head]
    if rule.needs_base_mean and base_means is None:
        raise ValueError(f"head {head!r} needs the base classes' mean embedding of every view: pass base_means")
    base_means = [None] * len(embeddings) if base_means is None else [mean.to(device) for mean in base_means]
    view_features = [None if rule.features is None else lambda rows, mean=mean: rule.features(rows, mean)
                     for mean in base_means]
    if _fits_on_device(embeddings, device):
        embeddings = [e.to(device) for e in embeddings]
    num_episodes, episode_size = episodes.shape
    query_labels = episode_labels(way, episode_size - way * shot, device)
    chunk_bytes = (chunk_mb or DEFAULT_CHUNK_MB.get(device.type, 256)) * 2**20
    row_bytes = sum(cache.shape[1] * (cache.element_size() + 4) for cache in embeddings)   # stored + float32
    chunk = max(1, min(num_episodes, chunk_bytes // (episode_size * row_bytes)))
    # Nearest prototype on cached episodes: the centred form, with each row's term computed once.
    centred = rule.classify is nearest_prototype
    statistics = [centered_statistics(cache, device, max(1, chunk_bytes // row_bytes), features) if centred else None
                  for cache, features in zip(embeddings, view_features)]
    support_labels = episode_labels(way, way * shot, device)
    # Reused buffers: a fresh allocation this large page-faults on every chunk, slower than the copy.
    buffers = [(torch.empty((chunk * episode_size, cache.shape[1]), dtype=cache.dtype, device=cache.device),
                torch.empty((chunk, episode_size, cache.shape[1]), dtype=torch.float32, device=device))
               for cache in embeddings]
    votes = votes_for(names)
    correct = {name: torch.empty(num_episodes, dtype=torch.long) for name in votes}
    finite = torch.ones((), dtype=torch.bool, device=device)

    def record(first: int, views: dict[str, ViewScores]) -> None:
        for name, vote in votes.items():
            logits = vote(views)
            correct[name][first:first + len(logits)] = (logits.argmax(-1) == query_labels).sum(1).cpu()
            finite.logical_and_(torch.isfinite(logits).all())
            if logits_sink is not None:
                logits_sink(name, logits, query_labels)

    pending: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []   # in the support's span, not yet fitted
    pending_start = 0
    with tqdm(total=num_episodes, desc="score", unit="episode", disable=not progress) as bar:
        for start in range(0, num_episodes, chunk):
            indices = torch.from_numpy(np.ascontiguousarray(episodes[start:start + chunk])).long()
            query_indices = indices[:, way * shot:].to(device)
            count = len(indices)
            views, reduced = {}, {}
            for name, cache, features, statistic, (gathered, rows) in zip(names, embeddings, view_features,
                                                                            statistics, buffers):
                flat_indices = indices.flatten().to(cache.device)
                torch.index_select(cache, 0, flat_indices, out=gathered[:len(flat_indices)])
                rows[:count].view(len(flat_indices), -1).copy_(gathered[:len(flat_indices)], non_blocking=True)
                episode_rows = rows[:count] if features is None else features(rows[:count])
                support, queries = episode_rows[:, :way * shot], episode_rows[:, way * shot:]
                if rule.in_support_span:
                    reduced[name] = support_span_coordinates(support, queries)
                elif statistic is None:
                    views[name] = rule.classify(support, support_labels, queries, way)
                else:
                    center, squared_norms = statistic
                    prototypes = class_prototypes(support, way)
                    logits = centered_prototype_logits(queries, squared_norms[query_indices], center, prototypes)
                    views[name] = ViewScores(logits, prototypes)
            if not rule.in_support_span:
                record(start, views)
                bar.update(count)
                continue
            pending.append(reduced)
            fitted = start + count - pending_start
            if fitted >= SPAN_FIT_EPISODES or start + count == num_episodes:
                # One optimisation over the whole stack of pending episodes, in S, not D, dimensions.
                record(pending_start, {name: rule.classify(torch.cat([part[name][0] for part in pending]),
                                                           support_labels,
                                                           torch.cat([part[name][1] for part in pending]), way)
                                       for name in names})
                pending, pending_start = [], start + count
                bar.update(fitted)
    if not finite:
        raise EvaluationError("the distances between embeddings overflowed (non-finite scores): the checkpoint "
                              "has diverged or its features are too large to compare; no accuracy is reported")
    return {name: count.numpy() * 100.0 / len(query_labels) for name, count in correct.items()}


def accuracy_summary(accuracies: np.ndarray) -> dict[str, float]:
    """Mean per-episode accuracy and its 95% interval, 1.96 * std / sqrt(episodes)."""
    return {"acc": float(accuracies.mean()),
            "ci95": float(1.96 * accuracies.std() / np.sqrt(len(accuracies)))}


def sample_episodes(labels: np.ndarray, way: int, shot: int, query: int, episodes: int,
                    seeds: Sequence[int]) -> np.ndarray:
    """(len(seeds) * episodes, way*(shot+query)) indices: each seed's episodes from the shared sampler."""
    return np.concatenate([EpisodeSampler(labels, way, shot, query, episodes, seed=seed).sample()
                           for seed in seeds])


def evaluate_heads(model: torch.nn.Module, dataset: torch.utils.data.Dataset, way: int, shot: int,
                   query: int, episodes: int, seeds: Sequence[int], heads: Sequence[str] = (PROTO,),
                   base_dataset: torch.utils.data.Dataset | None = None, means_dir: str | Path | None = None,
                   batch_size: int = 128, device: str | torch.device = "cpu", amp: str = "off", num_workers: int = 0,
                   storage_dtype: torch.dtype = torch.float16, max_memory_gb: float | None = None,
                   cache_dir: str | None = None, progress: bool = True,
                   report: dict | None = None, logits_sink: LogitsSink | None = None) -> dict[str, dict[str, dict]]:
    """The published protocol (README "Evaluation") on `dataset` (already carrying its test transform), for
    every head of `heads` (`bml.scoring.HEADS`) from one embedding pass.

    A head that centres on the base classes' mean (`cl2n`) needs `base_dataset`, the training split with
    the test transform: its means are embedded once (`base_class_means`, kept in `means_dir` when given).
    `report`, when given, receives 'storage' (the dtype the embeddings were cached in) and, when
    float16 could not hold them, 'storage_note'. `logits_sink` receives the logits of the published head
    (`proto`) only, as in `score_episodes`.

    Returns {head: {vote: results}} for every vote of `score_episodes` (each view name, 'bml': the argmax
    of the summed view logits, for a one-view baseline that view; 'bml_scaled' with two views), results
    {'acc', 'ci95', 'per_seed': {seed: {'acc', 'ci95'}}}. The overall 'acc' is the mean of the seeds'
    accuracies, its 'ci95' the interval over all the seeds' episodes together.
    """
    seeds, heads = list(seeds), list(dict.fromkeys(heads))
    unknown = [head for head in heads if head not in HEADS]
    if unknown:
        raise EvaluationError(f"unknown head(s) {', '.join(unknown)}: choose from {', '.join(HEADS)}")
    centring = [head for head in heads if HEADS[head].needs_base_mean]
    if centring and base_dataset is None:
        raise EvaluationError(f"head(s) {', '.join(centring)} centre on the base classes' mean embedding: "
                              f"they need the training split (base_dataset)")
    indices = sample_episodes(dataset.labels, way, shot, query, episodes, seeds)
    embedding = dict(batch_size=batch_size, device=device, amp=amp, num_workers=num_workers,
                     max_memory_gb=max_memory_gb, cache_dir=cache_dir, progress=progress)
    cache = embed_dataset(model, dataset, storage_dtype=storage_dtype, **embedding)
    if report is not None:
        report["storage"] = str(cache[0].dtype).removeprefix("torch.")
        if cache[0].dtype != storage_dtype:
            report["storage_note"] = f"{STORAGE_FALLBACK_NOTE}: cached in {report['storage']} instead"
    base_means = base_class_means(model, base_dataset, means_dir=means_dir, **embedding) if centring else None
    results: dict[str, dict[str, dict]] = {}
    for head in heads:
        accuracies = score_episodes(cache, indices, way, shot, device=device, names=model.view_names,
                                    progress=progress, head=head, base_means=base_means,
                                    logits_sink=logits_sink if head == PROTO else None)
        results[head] = {name: seed_summaries(per_episode, seeds) for name, per_episode in accuracies.items()}
    return results


def seed_summaries(per_episode: np.ndarray, seeds: Sequence[int]) -> dict:
    """{'acc': the mean of the seeds' accuracies, 'ci95' over all episodes, 'per_seed': {seed: summary}}."""
    per_seed = {seed: accuracy_summary(seed_accuracies)
                for seed, seed_accuracies in zip(seeds, np.split(per_episode, len(seeds)))}
    overall = accuracy_summary(per_episode)
    overall["acc"] = float(np.mean([summary["acc"] for summary in per_seed.values()]))
    return {**overall, "per_seed": per_seed}


def evaluate_episodes(model: torch.nn.Module, dataset: torch.utils.data.Dataset, way: int, shot: int,
                      query: int, episodes: int, seeds: Sequence[int], **options) -> dict[str, dict]:
    """`evaluate_heads` of the published head alone (`proto`): {vote: results}. `options`: those of
    `evaluate_heads` but `heads`."""
    return evaluate_heads(model, dataset, way, shot, query, episodes, seeds, heads=(PROTO,), **options)[PROTO]


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


def parse_seed_range(token: str) -> list[int]:
    """argparse type for one `--seeds` token: a seed ('3') or an inclusive range ('0-9')."""
    first, _, last = token.partition("-")
    try:
        seeds = list(range(int(first), int(last or first) + 1))
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"{token!r} is not a seed (e.g. 3) or an increasing range (e.g. 0-9)")
    return seeds


def results_paths(label: str, shot: int, output_dir: str | Path = "eval_results",
                  json_path: str | Path | None = None) -> tuple[Path, Path]:
    """`<output_dir>/<label>_bml_eval_results_<shot>shot.txt` and the JSON path (default: beside it)."""
    text_path = Path(output_dir) / f"{label}_bml_eval_results_{shot}shot.txt"
    return text_path, Path(json_path) if json_path else text_path.with_suffix(".json")


def write_results(results: dict[str, dict], label: str, shot: int, output_dir: str | Path = "eval_results",
                  json_path: str | Path | None = None, metadata: dict | None = None,
                  head_results: dict[str, dict] | None = None) -> tuple[Path, Path]:
    """Write `<label>_bml_eval_results_<shot>shot.txt` (the published format) and its JSON beside it.

    The text file has one `seed: acc` line per seed of the combined prediction, then
    `==> Mean ACC on <label>: acc`; the JSON has `metadata`, every view's results (`results`, the
    published head) and, under `head_results`, those of the other heads ({head: {vote: results}}).
    """
    text_path, json_path = results_paths(label, shot, output_dir, json_path)
    combined = results[COMBINED]
    lines = [f"{seed}: {summary['acc']:.4f}" for seed, summary in combined["per_seed"].items()]
    lines.append(f"==> Mean ACC on {label}: {combined['acc']:.4f}")
    with atomic_write(text_path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with atomic_write(json_path, "w") as handle:
        extra = {"head_results": head_results} if head_results else {}
        handle.write(json.dumps({**(metadata or {}), "results": results, **extra}, indent=2) + "\n")
    return text_path, json_path
