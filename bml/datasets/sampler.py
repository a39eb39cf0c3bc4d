"""The one episodic batch sampler (SPEC section 2), and the data loaders built around it.

An N-way K-shot Q-query episode is a list of N*(K+Q) dataset indices in shot-major order: position
i*N + c holds the i-th image of the c-th drawn class, so the first N*K are the support set and query j
has episode label j mod N. A whole epoch is drawn at once with array operations.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .base import DatasetError

_MAX_KEYS = 1 << 22   # random keys drawn at once when choosing images (32 MiB of float64)


def episode_labels(way: int, count: int) -> torch.Tensor:
    """Episode labels of `count` shot-major positions: position j -> j % way."""
    return torch.arange(count, dtype=torch.long) % way


class EpisodeSampler(Sampler[list[int]]):
    """Yields `episodes` episodes per epoch; usable as a DataLoader `batch_sampler`.

    Episodes depend only on (seed, rank, epoch): reproducible, and different on every rank of a
    distributed run (each process draws its own episodes; world_size is kept for bookkeeping).
    """

    def __init__(self, labels, way: int, shot: int, query: int, episodes: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels).reshape(-1)
        class_ids, classes = np.unique(labels, return_inverse=True)
        counts = np.bincount(classes, minlength=len(class_ids))
        per_class = shot + query
        if min(way, shot, episodes) < 1 or query < 0:
            raise DatasetError(f"episodes need way >= 1, shot >= 1, query >= 0 and episodes >= 1; "
                               f"got way={way}, shot={shot}, query={query}, episodes={episodes}")
        if way > len(class_ids):
            raise DatasetError(f"{way}-way episodes need {way} classes, but this split has only {len(class_ids)}: "
                               f"lower --way (or use a split/data set with more classes)")
        if counts.min() < per_class:
            small = int(np.argmin(counts))
            raise DatasetError(
                f"class {class_ids[small]} has only {counts[small]} images, fewer than shot + query = {per_class}: "
                f"lower --shot/--query, or remove classes with fewer than {per_class} images"
            )
        # members[c, :counts[c]] are the dataset indices of class c; the rest is padding.
        order = np.argsort(classes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        column = np.arange(len(labels)) - np.repeat(starts, counts)
        self.members = np.zeros((len(class_ids), counts.max()), dtype=np.int64)
        self.members[classes[order], column] = order
        self.counts = counts
        self.way, self.shot, self.query, self.episodes = way, shot, query, episodes
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.episodes

    def sample(self) -> np.ndarray:
        """The epoch's episodes, (episodes, way * (shot + query)) int64 dataset indices."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, self.epoch]))
        num_classes, width = self.members.shape
        per_class = self.shot + self.query
        classes = np.argsort(rng.random((self.episodes, num_classes)), axis=1)[:, :self.way]
        chunk = max(1, _MAX_KEYS // (self.way * width))
        picked = np.empty((self.episodes, self.way, per_class), dtype=np.int64)
        for start in range(0, self.episodes, chunk):
            drawn = classes[start:start + chunk]
            keys = rng.random((*drawn.shape, width))
            keys[np.arange(width) >= self.counts[drawn][..., None]] = np.inf   # padding sorts last
            positions = np.argsort(keys, axis=-1)[..., :per_class]
            picked[start:start + chunk] = self.members[drawn[..., None], positions]
        return picked.transpose(0, 2, 1).reshape(self.episodes, -1)

    def __iter__(self) -> Iterator[list[int]]:
        for episode in self.sample():
            yield episode.tolist()


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` from the worker's torch seed, which differs per worker and per epoch."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _generator(seed: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def build_episode_loader(dataset: Dataset, sampler: EpisodeSampler, num_workers: int = 0,
                         pin_memory: bool = False) -> DataLoader:
    """Loads the sampler's episodes; each batch is (images, dataset labels) in shot-major order."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=seed_worker, generator=_generator(sampler.seed, sampler.rank),
                      persistent_workers=num_workers > 0)


def build_shuffled_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0, rank: int = 0,
                          world_size: int = 1, drop_last: bool = True, pin_memory: bool = False) -> DataLoader:
    """Shuffled batches for the global baseline; call `loader.sampler.set_epoch(epoch)` every epoch.

    A DistributedSampler (also for one process) gives each rank its own 1/world_size of the data.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, worker_init_fn=seed_worker,
                      generator=_generator(seed, rank), persistent_workers=num_workers > 0)
