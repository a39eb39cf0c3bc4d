"""The episode sampler: shot-major order, labels, reproducibility, ranks, epochs, validation; shuffled
batches; the step loader and its per-step augmentation seeds."""
import numpy as np
import pytest
import torch

from bml.datasets import (ArrayDataset, DatasetError, EpisodeSampler, StepBatches, build_dataset, build_step_loader,
                          episode_labels, shuffled_batches)
from bml.datasets import sampler as sampler_module


def uneven_labels(num_classes: int = 12, seed: int = 0) -> np.ndarray:
    """Shuffled labels with 12..20 images per class and non-contiguous ids."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(12, 21, size=num_classes)
    return rng.permutation(np.repeat(np.arange(num_classes) * 3 + 1, counts))


def test_shot_major_order_and_labels():
    labels = uneven_labels()
    way, shot, query = 5, 2, 3
    episodes = EpisodeSampler(labels, way, shot, query, episodes=50).sample()
    assert episodes.shape == (50, way * (shot + query)) and episodes.dtype == np.int64
    for episode in episodes:
        assert len(set(episode.tolist())) == len(episode)                 # distinct images
        grid = labels[episode].reshape(shot + query, way)                 # row i: i-th image of every class
        assert (grid == grid[0]).all() and len(set(grid[0])) == way      # column c: one class, N distinct
        query_classes = labels[episode[way * shot:]]
        position_labels = episode_labels(way, way * query).numpy()
        assert (query_classes == grid[0][position_labels]).all()          # query j has label j mod N
    assert episode_labels(3, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert episode_labels(3, 7).dtype == torch.long


def test_reproducible_per_seed_rank_epoch():
    labels = uneven_labels()
    make = lambda **kw: EpisodeSampler(labels, 5, 1, 4, episodes=20, **kw)
    np.testing.assert_array_equal(make(seed=3).sample(), make(seed=3).sample())
    assert not np.array_equal(make(seed=3).sample(), make(seed=4).sample())
    assert not np.array_equal(make(rank=0, world_size=2).sample(), make(rank=1, world_size=2).sample())
    sampler = make()
    first = sampler.sample()
    sampler.set_epoch(1)
    assert not np.array_equal(first, sampler.sample())
    sampler.set_epoch(0)
    np.testing.assert_array_equal(first, sampler.sample())


def test_iteration_as_batch_sampler():
    labels = uneven_labels()
    sampler = EpisodeSampler(labels, 4, 1, 2, episodes=6)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 6
    assert all(isinstance(b, list) and isinstance(b[0], int) and len(b) == 12 for b in batches)
    np.testing.assert_array_equal(np.array(batches), sampler.sample())
    dataset = ArrayDataset(np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(3, axis=3), labels,
                           [str(c) for c in range(labels.max() + 1)], transform=lambda image: torch.tensor(image.getpixel((0, 0))))
    loader = build_step_loader(dataset, {0: sampler.sample()}.__getitem__, seed_key=(0,), first=(0, 0), last_epoch=0,
                               steps_per_epoch=6)
    for (pixels, batch_labels), batch in zip(loader, batches):
        assert pixels[:, 0].tolist() == batch and (batch_labels.numpy() == labels[batch]).all()


def test_every_class_and_image_gets_drawn():
    labels = uneven_labels(num_classes=6)
    drawn = EpisodeSampler(labels, 3, 2, 2, episodes=400).sample()
    assert set(np.unique(drawn).tolist()) == set(range(len(labels)))
    counts = np.bincount(labels[drawn[:, 0]], minlength=labels.max() + 1)[np.unique(labels)]
    assert counts.min() > 400 / 6 * 0.6    # first drawn class roughly uniform


def test_chunked_drawing_gives_the_same_episodes(monkeypatch):
    labels = uneven_labels()
    whole = EpisodeSampler(labels, 5, 1, 3, episodes=30, seed=7).sample()
    monkeypatch.setattr(sampler_module, "_MAX_KEYS", 1)   # one episode per chunk
    np.testing.assert_array_equal(EpisodeSampler(labels, 5, 1, 3, episodes=30, seed=7).sample(), whole)


def test_validation_errors():
    labels = uneven_labels(num_classes=4)
    with pytest.raises(DatasetError, match="5-way episodes need 5 classes, but this split has only 4"):
        EpisodeSampler(labels, 5, 1, 1, episodes=1)
    with pytest.raises(DatasetError, match=r"class \d+ has only \d+ images, fewer than shot \+ query = 30"):
        EpisodeSampler(labels, 2, 10, 20, episodes=1)
    with pytest.raises(DatasetError, match="shot >= 1"):
        EpisodeSampler(labels, 2, 0, 1, episodes=1)


def test_shuffled_batches_cover_each_image_once_and_shard_ranks():
    shares = [shuffled_batches(23, batch_size=5, batches=2, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert shares[0].shape == (2, 5)
    drawn = np.concatenate([share.reshape(-1) for share in shares])
    assert len(set(drawn.tolist())) == 20 and drawn.max() < 23                 # disjoint ranks, no repeats
    np.testing.assert_array_equal(shares[0], shuffled_batches(23, 5, 2, seed=1, epoch=0, rank=0, world_size=2))
    assert not np.array_equal(shares[0], shuffled_batches(23, 5, 2, seed=1, epoch=1, rank=0, world_size=2))
    with pytest.raises(DatasetError, match="need 30 images, but the split has 23"):
        shuffled_batches(23, batch_size=5, batches=3, seed=0, epoch=0, world_size=2)


def test_step_batches_are_seeded_per_step():
    """A step's augmentation depends on its seed only, not on the RNG state of the loading process."""
    dataset = build_dataset("glyphs", "train", image_size=32, train=True)
    batches = StepBatches(dataset, {1: np.arange(40).reshape(2, 2, 10)}.__getitem__, seed_key=(0, 0))
    first = batches[1, 1]
    torch.manual_seed(123)
    stream = torch.get_rng_state()
    again = batches[1, 1]
    assert torch.equal(first[0], again[0]) and first[0].shape == (2, 10, 3, 32, 32)
    assert torch.equal(torch.get_rng_state(), stream)                # loading left the stream alone
    assert not torch.equal(batches[1, 0][0], first[0])


@pytest.mark.parametrize("augment", ["host", "device"])
def test_step_loader_images_do_not_depend_on_workers_or_start(augment):
    """Two epochs of 4 steps (the same plan): the same images with 0 or 2 workers and when resumed in the
    middle of the first epoch; the second epoch augments the same indices differently."""
    dataset = build_dataset("glyphs", "train", image_size=32, train=True, transform="D")
    plans = {epoch: EpisodeSampler(dataset.labels, way=3, shot=1, query=1, episodes=4).sample() for epoch in (1, 2)}

    def load(first=(1, 0), num_workers=0):
        return [images for images, _ in build_step_loader(dataset, plans.__getitem__, (0, 0), first=first, last_epoch=2,
                                                          steps_per_epoch=4, num_workers=num_workers, augment=augment)]

    serial, parallel, resumed = load(), load(num_workers=2), load(first=(1, 2))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(parallel) == 8
    assert all(torch.equal(a, b) for a, b in zip(serial[2:], resumed)) and len(resumed) == 6
    assert serial[0].shape == (3 * 2, 3, 32, 32) and serial[0].dtype == torch.float32
    assert not torch.equal(serial[0], serial[4])
