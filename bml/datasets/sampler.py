"""The one episodic batch sampler, shuffled batches, and the one training loader.

An N-way K-shot Q-query episode is a list of N*(K+Q) dataset indices in shot-major order: position
i*N + c holds the i-th image of the c-th drawn class, so the first N*K are the support set and query j
has episode label j mod N. A whole epoch is drawn at once with array operations.

An `EpisodeRule` narrows what an episode may hold: all its classes from one group (Omniglot's alphabet: a
within-alphabet episode), and its support and query images by different drawers (Lake et al.'s one-shot
protocol: each of the episode's support images drawn by one person, each query by another).

Training draws each epoch's *plan* (the dataset indices of every step: episodes from
`EpisodeSampler.sample`, or `shuffled_batches` for the global baseline) and loads the run's steps
with `build_step_loader`, which augments each step from its own seed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..utils.rng import derive_seed, isolated_cpu_rng
from ..utils.workers import leave_stopping_to_the_main_process
from .base import DatasetError, FileDataset
from .device_augment import DeviceAugment, DeviceAugmentLoader, cut_regions, draw_parameters

_MAX_KEYS = 1 << 22   # random keys drawn at once when choosing images (32 MiB of float64)


@dataclass(frozen=True)
class EpisodeRule:
    """What an episode may hold beyond its shape; the default draws classes and images freely."""

    within_group: bool = False
    """Every class of an episode from one group (Omniglot: one alphabet); the group uniformly among those with at
    least `way` classes."""
    distinct_drawers: bool = False
    """Each episode draws shot + query distinct drawers: its i-th support images are all by the i-th, its j-th
    queries all by the (shot + j)-th, so no query shares a drawer with any support image."""

    @property
    def active(self) -> tuple[str, ...]:
        """The names of the parts in force (each also names its command-line flag, `bml.cli.episode_rule`)."""
        return tuple(part.name for part in fields(self) if getattr(self, part.name))

    @property
    def label(self) -> str:
        """A short name for results files ('' for the default)."""
        return "_".join(self.active)

    @property
    def description(self) -> str:
        """The parts in force in words, for messages ('' for the default)."""
        return " ".join(self.label.split("_"))


class EpisodeSampler(Sampler[list[int]]):
    """Yields `episodes` episodes per epoch; usable as a DataLoader `batch_sampler`.

    Episodes depend only on (seed, rank, epoch): reproducible, and different on every rank of a
    distributed run (each process draws its own episodes; world_size is kept for bookkeeping).
    `groups` (one id per image, the same for all images of a class) draws every episode within one group;
    `drawers` (one id per image, every class drawn once by each drawer) draws support and query from
    different drawers (`EpisodeRule`). Without either, episodes are those of the free rule.
    """

    def __init__(self, labels, way: int, shot: int, query: int, episodes: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, groups=None, drawers=None):
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
        self.class_groups = None if groups is None else _class_groups(np.asarray(groups).reshape(-1), classes,
                                                                      class_ids, way)
        self.by_drawer = None if drawers is None else _images_by_drawer(np.asarray(drawers).reshape(-1), classes,
                                                                        class_ids)

    def _draw_classes(self, rng: np.random.Generator) -> np.ndarray:
        """(episodes, way) class rows: any classes, or all of one group drawn per episode."""
        num_classes = len(self.counts)
        keys = rng.random((self.episodes, num_classes))
        if self.class_groups is not None:
            groups, members = self.class_groups
            chosen = groups[rng.integers(len(groups), size=self.episodes)]
            keys[members[None, :] != chosen[:, None]] = np.inf     # classes of other groups sort last
        return np.argsort(keys, axis=1)[:, :self.way]

    def _by_distinct_drawers(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(episodes, way, shot + query) images: per episode shot + query distinct drawers, the k-th of which drew
        the k-th image of every class."""
        drawers = np.argsort(rng.random((self.episodes, self.by_drawer.shape[1])), axis=1)[:, :self.shot + self.query]
        return self.by_drawer[classes[..., None], drawers[:, None, :]]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.episodes

    def sample(self) -> np.ndarray:
        """The epoch's episodes, (episodes, way * (shot + query)) int64 dataset indices."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, self.epoch]))
        width = self.members.shape[1]
        per_class = self.shot + self.query
        classes = self._draw_classes(rng)
        if self.by_drawer is not None:
            return self._by_distinct_drawers(classes, rng).transpose(0, 2, 1).reshape(self.episodes, -1)
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


def _class_groups(groups: np.ndarray, classes: np.ndarray, class_ids: np.ndarray, way: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(the groups with at least `way` classes, the group of each class), checked: one group per class."""
    if len(groups) != len(classes):
        raise DatasetError(f"{len(groups)} group ids for {len(classes)} images: give one per image")
    group_ids, group_of_image = np.unique(groups, return_inverse=True)
    member = np.full(len(class_ids), -1)
    member[classes] = group_of_image
    if (member[classes] != group_of_image).any():
        image = int(np.argmax(member[classes] != group_of_image))
        raise DatasetError(f"class {class_ids[classes[image]]} has images in more than one group: a group holds "
                           "whole classes")
    sizes = np.bincount(member, minlength=len(group_ids))
    eligible = np.flatnonzero(sizes >= way)
    if not len(eligible):
        raise DatasetError(f"{way}-way episodes within one group need a group of {way} classes, but the largest "
                           f"group ({group_ids[np.argmax(sizes)]}) has {sizes.max()}: lower the number of ways")
    return eligible, member


def _images_by_drawer(drawers: np.ndarray, classes: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """(classes, drawers) table of the image of each class by each drawer, checked complete and unique (so every
    class has as many images as there are drawers, which the count check compares with shot + query)."""
    if len(drawers) != len(classes):
        raise DatasetError(f"{len(drawers)} drawer ids for {len(classes)} images: give one per image")
    if (drawers < 0).any():
        raise DatasetError(f"image {int(np.argmax(drawers < 0))} has no recorded drawer: episodes by distinct "
                           "drawers need every image's")
    drawer_ids, drawer_of_image = np.unique(drawers, return_inverse=True)
    table = np.full((len(class_ids), len(drawer_ids)), -1, dtype=np.int64)
    table[classes, drawer_of_image] = np.arange(len(classes))
    filled = np.zeros_like(table)
    np.add.at(filled, (classes, drawer_of_image), 1)
    if (filled != 1).any():
        c, d = np.argwhere(filled != 1)[0]
        raise DatasetError(f"class {class_ids[c]} has {filled[c, d]} images by drawer {drawer_ids[d]}: episodes by "
                           "distinct drawers need every class drawn exactly once by every drawer")
    return table


def episode_sampler(dataset, way: int, shot: int, query: int, episodes: int, seed: int = 0,
                    rule: EpisodeRule = EpisodeRule(), rank: int = 0, world_size: int = 1) -> EpisodeSampler:
    """The `EpisodeSampler` of `dataset` (a `FewShotDataset`, or just its labels under the free rule) under `rule`,
    its groups and drawers read from the data set; a rule the data set cannot follow is an error naming what it
    lacks."""
    labels = np.asarray(getattr(dataset, "labels", dataset))
    groups = drawers = None
    name = f"{getattr(dataset, 'name', '')} {getattr(dataset, 'split', '')}".strip() or "this data set"
    if rule.within_group:
        class_groups = getattr(dataset, "class_groups", None)
        if class_groups is None:
            raise DatasetError(f"{name} declares no groups of classes, so episodes cannot be drawn within one group: "
                               "leave the group option out (omniglot and omniglot-lake group by alphabet)")
        groups = np.unique(class_groups, return_inverse=True)[1][labels]
    if rule.distinct_drawers:
        drawers = getattr(dataset, "drawers", None)
        if drawers is None:
            raise DatasetError(f"{name} does not record who drew each image, so support and query cannot be by "
                               "different drawers: leave the drawer option out (omniglot and omniglot-lake record "
                               "drawers)")
    return EpisodeSampler(labels, way, shot, query, episodes, seed=seed, rank=rank, world_size=world_size,
                          groups=groups, drawers=drawers)


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
    """Item (epoch, step) is that step's images, (*plan.shape[1:], 3, S, S), and their dataset labels.

    `plans(epoch)` holds the dataset indices of every step of `epoch` (one or more episodes or
    shuffled batches per step); a worker computes it once per epoch. Step (epoch, step) is augmented
    from its own seed (*seed_key, epoch, step) with the loading process's generators left as they
    were, so a step's images depend neither on the number of loader workers nor on where a resumed
    run starts, and loading never shifts the training stream (dropout, DropBlock).

    augment 'device': the item is (uint8 images (*plan.shape[1:], H, W, 3), labels, parameters
    (*plan.shape[1:], P)) for `DeviceAugment`: the stored images of an `ArrayDataset`, else each image's
    crop box cut out of it (`cut_regions`: images of mixed sizes). The dataset must be a `FewShotDataset`:
    its images (`load_array`), `transform_id` and `image_size` are used (not its `transform`).
    """

    def __init__(self, dataset: Dataset, plans: Callable[[int], np.ndarray], seed_key: tuple[int, ...],
                 augment: str = "host") -> None:
        self.dataset, self.plans, self.seed_key, self.augment = dataset, plans, seed_key, augment
        self.stored = getattr(dataset, "images", None) if augment == "device" else None
        self._plan_epoch, self._plan = None, None

    def plan(self, epoch: int) -> np.ndarray:
        if self._plan_epoch != epoch:
            self._plan_epoch, self._plan = epoch, self.plans(epoch)
        return self._plan

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, step = key
        indices = self.plan(epoch)[step]
        labels = torch.from_numpy(np.asarray(self.dataset.labels)[indices])
        with isolated_cpu_rng(derive_seed(*self.seed_key, epoch, step)):
            if self.augment == "host":
                images = torch.stack([self.dataset[int(index)][0] for index in indices.reshape(-1)])
                return images.reshape(*indices.shape, *images.shape[1:]), labels
            transform_id, size = self.dataset.transform_id, self.dataset.image_size
            if self.stored is not None:
                images = self.stored[indices.reshape(-1)]
                parameters = draw_parameters(len(images), transform_id, images.shape[1:3], size)
            else:
                images = [self.dataset.load_array(int(index)) for index in indices.reshape(-1)]
                sizes = torch.tensor([image.shape[:2] for image in images])
                images, parameters = cut_regions(images, draw_parameters(len(images), transform_id, sizes, size), size)
        return (torch.from_numpy(images).reshape(*indices.shape, *images.shape[1:]), labels,
                parameters.reshape(*indices.shape, -1))


def step_keys(first: tuple[int, int], last_epoch: int, steps_per_epoch: int) -> list[tuple[int, int]]:
    """(epoch, step) of every step from `first` to the end of `last_epoch`."""
    first_epoch, first_step = first
    return [(epoch, step) for epoch in range(first_epoch, last_epoch + 1)
            for step in range(first_step if epoch == first_epoch else 0, steps_per_epoch)]


def available_cpus() -> int:
    """CPUs this process may run on (what DataLoader compares num_workers with)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(processes_per_machine: int = 1) -> int:
    """Loader workers per training process: the CPUs left after the training processes themselves,
    shared between them, at least 1 and at most 8 (with `--augment device` a worker supplies thousands
    of images per second); never more than the CPUs, so DataLoader does not warn."""
    cpus = available_cpus()
    return min(cpus, 8, max(1, cpus // max(1, processes_per_machine) - 1))


def build_step_loader(dataset: Dataset, plans: Callable[[int], np.ndarray], seed_key: tuple[int, ...],
                      first: tuple[int, int], last_epoch: int, steps_per_epoch: int, num_workers: int = 0,
                      augment: str = "host", device: torch.device | str = "cpu", prefetch_steps: int = 4
                      ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The one training loader: the steps (epoch, step) from `first` to the end of `last_epoch`, each
    batch being `StepBatches[epoch, step]` (see there), as (images, labels).

    One loader serves the whole run, so its workers start once and keep `prefetch_steps` steps ready
    across the ends of epochs and validation. On CUDA batches come in pinned memory. augment 'device':
    the batches are uint8 images and parameters, augmented on `device` by `DeviceAugment`, and yielded there;
    the files of a `FileDataset` are then decoded once, into a store the workers read (`decode_once`).
    """
    device = torch.device(device)
    if augment == "device" and isinstance(dataset, FileDataset):
        dataset.decode_once()
    keys = step_keys(first, last_epoch, steps_per_epoch)
    loader = DataLoader(StepBatches(dataset, plans, seed_key, augment), batch_size=None, sampler=keys,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=max(2, -(-prefetch_steps // num_workers)) if num_workers else None,
                        generator=torch.Generator(),  # keeps the global RNG untouched
                        worker_init_fn=leave_stopping_to_the_main_process)
    if augment == "device":
        return DeviceAugmentLoader(loader, DeviceAugment(dataset.transform_id, dataset.image_size), device)
    return loader
