"""The published protocol (README "Evaluation"): seeds x episodes of a split, every head from one
embedding pass, summarised per seed and overall."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bml.datasets import EpisodeRule, episode_sampler
from bml.evaluation.base_means import base_class_means
from bml.evaluation.cache import STORAGE_FALLBACK_NOTE, EmbeddingOptions, embed_dataset
from bml.evaluation.cached_scoring import LogitsSink, score_episodes
from bml.evaluation.errors import EvaluationError
from bml.scoring import BASE_MEAN, HEADS, PROTO, heads_needing


def accuracy_summary(accuracies: np.ndarray) -> dict[str, float]:
    """Mean per-episode accuracy and its 95% interval, 1.96 * std / sqrt(episodes)."""
    return {"acc": float(accuracies.mean()),
            "ci95": float(1.96 * accuracies.std() / np.sqrt(len(accuracies)))}


def sample_episodes(dataset, way: int, shot: int, query: int, episodes: int, seeds: Sequence[int],
                    rule: EpisodeRule = EpisodeRule()) -> np.ndarray:
    """(len(seeds) * episodes, way*(shot+query)) indices: each seed's episodes from the shared sampler, under `rule`
    (`dataset`: a `FewShotDataset`, or its labels under the free rule)."""
    return np.concatenate([episode_sampler(dataset, way, shot, query, episodes, seed=seed, rule=rule).sample()
                           for seed in seeds])


def evaluate_heads(model: torch.nn.Module, dataset: torch.utils.data.Dataset, way: int, shot: int,
                   query: int, episodes: int, seeds: Sequence[int], heads: Sequence[str] = (PROTO,),
                   base_dataset: torch.utils.data.Dataset | None = None, means_dir: str | Path | None = None,
                   options: EmbeddingOptions = EmbeddingOptions(), report: dict | None = None,
                   logits_sink: LogitsSink | None = None, rule: EpisodeRule = EpisodeRule()
                   ) -> dict[str, dict[str, dict]]:
    """The published protocol (README "Evaluation") on `dataset` (already carrying its test transform), for
    every head of `heads` (`bml.scoring.HEADS`) from one embedding pass, embedded with `options`.

    A head whose side input is the base classes' mean (`bml.scoring.BASE_MEAN`: `cl2n`) needs `base_dataset`,
    the training split with the test transform: its means are embedded once (`base_class_means`, kept in
    `means_dir` when given).
    `report`, when given, receives 'storage' (the dtype the embeddings were cached in) and, when
    float16 could not hold them, 'storage_note'. `logits_sink` receives the logits of the published head
    (`proto`) only, as in `score_episodes`. `rule` narrows the episodes (`bml.datasets.EpisodeRule`: within one
    group, support and query by different drawers).

    Returns {head: {vote: results}} for every vote of `score_episodes` (each view name, 'bml': the argmax
    of the summed view logits, for a one-view baseline that view; 'bml_scaled' with two views), results
    {'acc', 'ci95', 'per_seed': {seed: {'acc', 'ci95'}}}. The overall 'acc' is the mean of the seeds'
    accuracies, its 'ci95' the interval over all the seeds' episodes together.
    """
    seeds, heads = list(seeds), list(dict.fromkeys(heads))
    unknown = [head for head in heads if head not in HEADS]
    if unknown:
        raise EvaluationError(f"unknown head(s) {', '.join(unknown)}: choose from {', '.join(HEADS)}")
    centring = heads_needing(BASE_MEAN, heads)
    if centring and base_dataset is None:
        raise EvaluationError(f"head(s) {', '.join(centring)} centre on the base classes' mean embedding: "
                              f"they need the training split (base_dataset)")
    indices = sample_episodes(dataset, way, shot, query, episodes, seeds, rule)
    cache = embed_dataset(model, dataset, options)
    if report is not None:
        report["storage"] = str(cache[0].dtype).removeprefix("torch.")
        if cache[0].dtype != options.storage_dtype:
            report["storage_note"] = f"{STORAGE_FALLBACK_NOTE}: cached in {report['storage']} instead"
    base_means = base_class_means(model, base_dataset, options, means_dir) if centring else None
    results: dict[str, dict[str, dict]] = {}
    for head in heads:
        accuracies = score_episodes(cache, indices, way, shot, device=options.device, names=model.view_names,
                                    progress=options.progress, head=head, base_means=base_means,
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
                      query: int, episodes: int, seeds: Sequence[int], options: EmbeddingOptions = EmbeddingOptions(),
                      report: dict | None = None, logits_sink: LogitsSink | None = None,
                      rule: EpisodeRule = EpisodeRule()) -> dict[str, dict]:
    """`evaluate_heads` of the published head alone (`proto`): {vote: results}."""
    return evaluate_heads(model, dataset, way, shot, query, episodes, seeds, heads=(PROTO,), options=options,
                          report=report, logits_sink=logits_sink, rule=rule)[PROTO]
