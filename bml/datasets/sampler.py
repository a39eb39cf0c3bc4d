"""The one episodic batch sampler, shuffled batches, and the one training loader.

An N-way K-shot Q-query episode is a list of N*(K+Q) dataset indices in shot-major order: position
i*N + c holds the i-th image of the c-th drawn class, so the first N*K are the support set and query j
has episode label j mod N. A whole epoch is drawn at once with array operations.

Training draws an epoch's *plan* first (the dataset indices of every step: episodes from
`EpisodeSampler.sample`, or `shuffled_batches` for the global baseline) and loads it with
`build_step_loader`, which augments each step from its own seed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..utils.rng import derive_seed, isolated_cpu_rng
from .base import DatasetError

_MAX_KEYS = 1 << 22   # random keys drawn at once when choosing images (32 MiB of float64)


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


def shuffled_batches(num_images: int, batch_size: int, batches: int, seed: int, epoch: int, rank: int = 0,
                     world_size: int = 1) -> np.ndarray:
    """This rank's shuffled batches of one epoch, (batches, batch_size) dataset indices.

    All ranks cut the same permutation (it depends on (seed, epoch) only) into world_size disjoint
    shares, so a distributed epoch still shows every image at most once.
    """
    needed = batches * batch_size * world_size
    if needed > num_images:
        raise DatasetError(f"{batches} batches of {batch_size} images on {world_size} process(es) need {needed} "
                           f"images, but the split has {num_images}: lower the batch size or the number of batches")
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    return order[:needed].reshape(batches, world_size, batch_size)[:, rank]


class StepBatches(Dataset):
    """Item `k` is step `k`'s images, (*plan.shape[1:], 3, S, S), and their dataset labels.

    `plan[k]` holds the dataset indices of step `k` (one or more episodes or shuffled batches). Step
    `k` is augmented from its own seed (seed_key, k) with the loading process's generators left as
    they were, so a step's images depend neither on the number of loader workers nor on where a
    resumed run starts, and loading never shifts the training stream (dropout, DropBlock).
    """

    def __init__(self, dataset: Dataset, plan: np.ndarray, seed_key: tuple[int, ...]) -> None:
        self.dataset = dataset
        self.plan = plan
        self.seed_key = seed_key

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.plan[step]
        with isolated_cpu_rng(derive_seed(*self.seed_key, step)):
            images = torch.stack([self.dataset[int(index)][0] for index in indices.reshape(-1)])
        labels = torch.from_numpy(np.asarray(self.dataset.labels)[indices])
        return images.reshape(*indices.shape, *images.shape[1:]), labels


def build_step_loader(dataset: Dataset, plan: np.ndarray, seed_key: tuple[int, ...], first_step: int = 0,
                      num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The one training loader: loads the steps of `plan` from `first_step` on (a resumed epoch skips
    the steps already done), each batch being `StepBatches[k]`."""
    return DataLoader(StepBatches(dataset, plan, seed_key), batch_size=None, sampler=range(first_step, len(plan)),
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator())  # keeps the global RNG untouched
