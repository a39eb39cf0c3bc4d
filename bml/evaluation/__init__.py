"""Few-shot evaluation (the published protocol, README "Evaluation"): embed a split once, score many episodes
from the cache.

The published protocol ran the network on the 100 images of every episode, 20,000 episodes for ten
seeds. In eval mode with a deterministic transform an image's embedding does not depend on the
episode, so each image is embedded once (`embed_dataset`, `cache`) and all episodes are scored from the
cached embeddings, many episodes per batched matrix product (`score_episodes`, `cached_scoring`). The
accuracies are those of the per-episode protocol; `tests/test_evaluation.py` checks this episode by episode.

The modules: `cache` (the embedding cache, in RAM or memory-mapped), `cached_scoring` (episodes scored
from it), `base_means` (the base classes' mean embedding a centring head needs), `protocol` (seeds x
episodes, every head, the summaries), `datasets` (the split evaluated), `results` (the files written),
`errors`.
"""
from bml.evaluation.base_means import BASE_MEANS_STORAGE, base_class_means, base_means_path
from bml.evaluation.cache import (STORAGE_FALLBACK_NOTE, EmbeddingOptions, allocate_cache, available_memory_bytes,
                                  embed_dataset, widen_cache)
from bml.evaluation.cached_scoring import (DEFAULT_CHUNK_MB, SPAN_FIT_EPISODES, LogitsSink, centered_statistics,
                                           float_chunks, mean_row, score_episodes)
from bml.evaluation.datasets import build_evaluation_dataset
from bml.evaluation.errors import EvaluationError
from bml.evaluation.protocol import (accuracy_summary, evaluate_episodes, evaluate_heads, sample_episodes,
                                     seed_summaries)
from bml.evaluation.results import CheckpointIdentity, ResultsPaths, parse_seed_range, results_paths, write_results

__all__ = [
    "BASE_MEANS_STORAGE", "CheckpointIdentity", "DEFAULT_CHUNK_MB", "ResultsPaths", "SPAN_FIT_EPISODES", "STORAGE_FALLBACK_NOTE", "EmbeddingOptions", "EvaluationError", "LogitsSink",
    "accuracy_summary", "allocate_cache", "available_memory_bytes", "base_class_means", "base_means_path",
    "build_evaluation_dataset", "centered_statistics", "embed_dataset", "evaluate_episodes", "evaluate_heads",
    "float_chunks", "mean_row", "parse_seed_range", "results_paths", "sample_episodes", "score_episodes",
    "seed_summaries", "widen_cache", "write_results",
]
