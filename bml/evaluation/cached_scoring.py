"""Scoring episodes from the embedding cache, many episodes per batched matrix product.

In eval mode with a deterministic transform an image's embedding does not depend on the episode, so
the episodes are gathered from the cached embeddings (`bml.evaluation.cache`) in chunks of a fixed
working memory and scored together; the accuracies are those of embedding every episode afresh.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from bml.evaluation.errors import EvaluationError
from bml.utils.progress import progress_bar
from bml.scoring import (BASE_MEAN, HEADS, PROTO, ViewScores, centered_prototype_logits, class_prototypes,
                         episode_labels, heads_needing, support_span_coordinates, votes_for)

# Working memory of one scoring chunk; on a CPU a chunk near the L3 cache size is several times faster.
DEFAULT_CHUNK_MB = {"cpu": 48, "cuda": 2048}
# Episodes a head fitted in the support's span (logreg) fits in one optimisation: about 10 kB each (5-way
# 5-shot 15-query, per view), where a gathered chunk holds a few episodes of 16,000-dimensional rows.
SPAN_FIT_EPISODES = 4096
LogitsSink = Callable[[str, torch.Tensor, torch.Tensor], None]
"""Receives (vote name, (episodes, queries, way) logits, (queries,) labels) of every scored chunk."""


def _fits_on_device(cache: Sequence[torch.Tensor], device: torch.device) -> bool:
    """True when the whole cache takes at most half of the accelerator's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(t.numel() * t.element_size() for t in cache) <= free / 2


def chunk_sizes(embeddings: Sequence[torch.Tensor], num_episodes: int, episode_size: int, device: torch.device,
                chunk_mb: int | None) -> tuple[int, int]:
    """(episodes, cache rows) of one scoring chunk in about `chunk_mb` MB (default: `DEFAULT_CHUNK_MB`),
    counting every view's stored row and its float32 copy."""
    chunk_bytes = (chunk_mb or DEFAULT_CHUNK_MB.get(device.type, 256)) * 2**20
    row_bytes = sum(cache.shape[1] * (cache.element_size() + 4) for cache in embeddings)
    return max(1, min(num_episodes, chunk_bytes // (episode_size * row_bytes))), max(1, chunk_bytes // row_bytes)


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


def score_episodes(embeddings: Sequence[torch.Tensor], episodes: np.ndarray, way: int, shot: int,
                   device: str | torch.device = "cpu", names: Sequence[str] | None = None,
                   chunk_mb: int | None = None, progress: bool = True, head: str = PROTO,
                   base_means: Sequence[torch.Tensor] | None = None,
                   logits_sink: LogitsSink | None = None) -> dict[str, np.ndarray]:
    """Per-episode query accuracy (%) of every vote of `bml.scoring.votes_for(names)`: each view alone, the
    sum of the views' logits (`'bml'`) and, with several views, `'bml_scaled'` (our extension).

    `episodes` is an (E, way*(shot+query)) index array into the cache, shot-major (see `bml.scoring`).
    Episodes are scored in chunks using about `chunk_mb` MB of working memory. `head` names how each
    view's logits are made (`bml.scoring.HEADS`); `base_means`, one per view, is the side input of a head
    that needs `bml.scoring.BASE_MEAN` (`base_class_means`). `logits_sink`, when given, also
    receives every vote's logits (calibration, `bml.calibration`).
    """
    device = torch.device(device)
    names = tuple(names) if names is not None else tuple(f"view{i}" for i in range(len(embeddings)))
    if len(names) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embedding views but {len(names)} names {names}")
    rule = HEADS[head]
    if heads_needing(BASE_MEAN, [head]) and base_means is None:
        raise ValueError(f"head {head!r} needs the base classes' mean embedding of every view: pass base_means")
    base_means = [None] * len(embeddings) if base_means is None else [mean.to(device) for mean in base_means]
    view_features = [None if rule.features is None else lambda rows, mean=mean: rule.features(rows, mean)
                     for mean in base_means]
    if _fits_on_device(embeddings, device):
        embeddings = [e.to(device) for e in embeddings]
    num_episodes, episode_size = episodes.shape
    query_labels = episode_labels(way, episode_size - way * shot, device)
    chunk, rows_per_chunk = chunk_sizes(embeddings, num_episodes, episode_size, device, chunk_mb)
    statistics = [centered_statistics(cache, device, rows_per_chunk, features) if rule.centred_fast_path else None
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
    with progress_bar(num_episodes, "scoring", unit="episode", enabled=progress) as bar:
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
