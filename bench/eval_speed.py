"""Evaluation speed: the per-episode protocol (embed every episode's images afresh) against the cached one.

    python bench/eval_speed.py                                  # 12,000 images, full width: long on a CPU
    python bench/eval_speed.py --images 2000 --per_episode 5    # what docs/BENCHMARKS.md reports
    python bench/eval_speed.py --images 2000 --per_episode 1 --heads proto cl2n logreg   # the heads' cost

Both protocols run the same model on the same synthetic miniImageNet-like test set (84 px uint8
images, the miniImageNet test transform). The per-episode protocol is timed on its first
`--per_episode` episodes; the cached one embeds the whole set once, then scores all seeds x episodes.
`--heads` then scores the same cached episodes with each test-time head (`bml.scoring.HEADS`; cl2n
centres on the test set's own mean here, which costs the same as the base classes'), one after the other.
Prints one JSON object: throughputs, the speed-up, how often the two protocols agree, and each head's
seconds per 20,000 episodes with its ratio to proto's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from bml.datasets import ArrayDataset, build_transform
from bml.evaluation import EmbeddingOptions, embed_dataset, sample_episodes, score_episodes
from bml.models import BML
from bml.scoring import COMBINED, HEADS, PROTO


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Time the per-episode and the cached evaluation protocols")
    parser.add_argument("--images", type=int, default=12000, help="test images (miniImageNet: 12,000)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-12 width multiplier (1.0: published)")
    parser.add_argument("--image_size", type=int, default=84)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=2000, help="episodes per seed")
    parser.add_argument("--per_episode", type=int, default=5, help="episodes timed with the per-episode protocol")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    parser.add_argument("--heads", nargs="*", choices=tuple(HEADS), default=[],
                        help="also time the scoring of each of these heads on the same cache")
    return parser


def synthetic_test_set(images: int, classes: int, image_size: int) -> ArrayDataset:
    """Random 84 px-stored images in equal classes, with the miniImageNet test transform (A)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (images, 84, 84, 3), dtype=np.uint8)
    labels = np.arange(images) % classes
    return ArrayDataset(pixels, labels, [f"class{c}" for c in range(classes)],
                        transform=build_transform("A", image_size))


def timed(function, *args, **kwargs):
    """(result, seconds), synchronising an accelerator so that its queued work is counted."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = BML(num_classes=64, width=args.width).to(args.device).eval()
    dataset = synthetic_test_set(args.images, args.classes, args.image_size)
    episodes = sample_episodes(dataset.labels, 5, args.shot, 15, args.episodes, range(args.seeds))
    embed_dataset(model, Subset(dataset, range(8)), EmbeddingOptions(device=args.device, progress=False))   # warm-up

    per_episode = {COMBINED: []}
    start = time.perf_counter()
    for episode in episodes[:args.per_episode]:
        fresh = embed_dataset(model, Subset(dataset, episode.tolist()),
                              EmbeddingOptions(batch_size=len(episode), device=args.device,
                                               storage_dtype=torch.float32, progress=False))
        scores = score_episodes(fresh, np.arange(len(episode))[None], 5, args.shot, device=args.device,
                                names=model.view_names, progress=False)
        per_episode[COMBINED].append(scores[COMBINED][0])
    per_episode_seconds = time.perf_counter() - start

    cache, embed_seconds = timed(embed_dataset, model, dataset,
                                 EmbeddingOptions(batch_size=args.batch_size, device=args.device))
    scores, score_seconds = timed(score_episodes, cache, episodes, 5, args.shot, device=args.device,
                                  names=model.view_names)
    total = len(episodes)
    heads = {}
    base_means = [view.float().mean(0) for view in cache]
    for head in args.heads:
        _, seconds = timed(score_episodes, cache, episodes, 5, args.shot, device=args.device, names=model.view_names,
                           head=head, base_means=base_means)
        heads[head] = {"seconds": round(seconds, 1), "seconds_per_20000_episodes": round(seconds * 20000 / total, 1)}
    for result in heads.values():
        if PROTO in heads:
            result["ratio_to_proto"] = round(result["seconds"] / heads[PROTO]["seconds"], 2)
    per_episode_rate = args.per_episode / per_episode_seconds
    cached_rate = total / (embed_seconds + score_seconds)
    return {
        "device": str(args.device), "threads": torch.get_num_threads(), "width": args.width,
        "images": args.images, "image_size": args.image_size, "shot": args.shot,
        "per_episode": {"episodes": args.per_episode, "seconds": round(per_episode_seconds, 1),
                        "episodes_per_s": round(per_episode_rate, 3),
                        "projected_seconds_for_all": round(total / per_episode_rate)},
        "cached": {"episodes": total, "embed_seconds": round(embed_seconds, 1),
                   "images_per_s": round(args.images / embed_seconds, 1), "score_seconds": round(score_seconds, 1),
                   "scored_episodes_per_s": round(total / score_seconds), "episodes_per_s": round(cached_rate, 1),
                   "seconds_over_one_model_pass": round((embed_seconds + score_seconds) / embed_seconds, 2)},
        "speedup": round(cached_rate / per_episode_rate),
        "same_accuracy_on_timed_episodes": bool(np.array_equal(per_episode[COMBINED],
                                                               scores[COMBINED][:args.per_episode])),
        **({"heads": heads} if heads else {}),
    }


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    figures = json.dumps(main(arguments), indent=2)
    print(figures)
    if arguments.json:
        Path(arguments.json).write_text(figures)
